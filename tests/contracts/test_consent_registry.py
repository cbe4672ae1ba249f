"""ConsentRegistry: patient binding, EIP-712 relayed actions, delegates, grants and revocations.

Python's EIP-712 digests (teleledger.ledger.chain.eip712) are checked against the contract's
``*_digest`` views and against eth-account's reference encoder; a Hypothesis state machine checks
that only the patient or their delegate (each directly or by signature) ever changes their consent,
and only the patient their delegates.
"""

from __future__ import annotations

import pytest

boa = pytest.importorskip("boa", reason="titanoboa (boa) is not installed: contract tests need it")
eth_account = pytest.importorskip("eth_account", reason="eth-account (comes with titanoboa) is not installed")

from eth_account import Account  # noqa: E402
from eth_account.messages import _hash_eip191_message, encode_typed_data  # noqa: E402
from hypothesis import settings, strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule  # noqa: E402

from teleledger.ledger.chain import ROLE_OPERATOR, ROLE_PRACTITIONER, eip712, source_path  # noqa: E402

ORG = b"A".rjust(32, b"\x00")
PSEUDONYM = bytes.fromhex("aa" * 32)
GRANTEE = b"G".rjust(32, b"\x00")
PROVISION = bytes.fromhex("cc" * 32)
FAR = 2**40
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
_DEPLOYERS: dict[str, object] = {}


def deployer(name):
    if name not in _DEPLOYERS:
        _DEPLOYERS[name] = boa.load_partial(str(source_path(name)))
    return _DEPLOYERS[name]


def chain_id() -> int:
    return boa.env.evm.patch.chain_id


def sign(account, message, contract):
    digest = eip712.digest(message, chain_id=chain_id(), verifying_contract=contract.address)
    sig = account.unsafe_sign_hash(digest)
    return sig.v, sig.r.to_bytes(32, "big"), sig.s.to_bytes(32, "big")


class World:
    def __init__(self):
        admin, org_admin = boa.env.generate_address(), boa.env.generate_address()
        self.participants = deployer("ParticipantRegistry").deploy([admin], 1)
        with boa.env.prank(admin):
            self.participants.approve_organization(ORG, org_admin)
        self.operator, self.doctor = boa.env.generate_address(), boa.env.generate_address()
        with boa.env.prank(org_admin):
            self.participants.set_member_roles(ORG, self.operator, ROLE_OPERATOR)
            self.participants.set_member_roles(ORG, self.doctor, ROLE_PRACTITIONER)
        self.consent = deployer("ConsentRegistry").deploy(self.participants.address)
        self.patient = Account.from_key(b"\x01" * 32)
        # a delegate signs (EIP-712) as well as calls directly, so it is a key, not just an address
        self.delegate_account = Account.from_key(b"\x03" * 32)
        self.delegate = self.delegate_account.address
        self.stranger = Account.from_key(b"\x02" * 32)

    def bind(self, pseudonym=PSEUDONYM, account=None):
        account = account or self.patient
        msg = eip712.BindPatient(
            pseudonym=pseudonym, signer=account.address, nonce=self.consent.nonces(pseudonym), deadline=FAR,
        )
        with boa.env.prank(self.operator):
            self.consent.bind_patient(ORG, pseudonym, account.address, FAR, *sign(account, msg, self.consent))

    def grant_msg(self, *, valid_from=0, valid_until=0, deadline=FAR, nonce=None):
        return eip712.GrantConsent(
            pseudonym=PSEUDONYM, grantee=GRANTEE, provision_hash=PROVISION, valid_from=valid_from,
            valid_until=valid_until, deadline=deadline,
            nonce=self.consent.nonces(PSEUDONYM) if nonce is None else nonce,
        )


@pytest.fixture(scope="module")
def world():
    return World()


@pytest.fixture(autouse=True)
def isolated():
    with boa.env.anchor():
        yield


def names(contract):
    return [type(e).__name__ for e in contract.get_logs()]


# ---- EIP-712: one digest in Python, in Solidity-land and in eth-account --------------------------

def test_domain_separator_matches_the_contract(world):
    assert world.consent.DOMAIN_SEPARATOR() == eip712.domain_separator(chain_id(), world.consent.address)


def _messages(world):
    d = world.delegate
    return [
        (eip712.BindPatient(pseudonym=PSEUDONYM, signer=world.patient.address, nonce=3, deadline=99),
         lambda c: c.bind_digest(PSEUDONYM, world.patient.address, 3, 99)),
        (eip712.GrantConsent(pseudonym=PSEUDONYM, grantee=GRANTEE, provision_hash=PROVISION,
                             valid_from=5, valid_until=2**64 - 1, nonce=7, deadline=2**256 - 1),
         lambda c: c.grant_digest(PSEUDONYM, GRANTEE, PROVISION, 5, 2**64 - 1, 7, 2**256 - 1)),
        (eip712.RevokeConsent(pseudonym=PSEUDONYM, grantee=GRANTEE, provision_hash=PROVISION, nonce=1, deadline=2),
         lambda c: c.revoke_digest(PSEUDONYM, GRANTEE, PROVISION, 1, 2)),
        (eip712.SetDelegate(pseudonym=PSEUDONYM, delegate=d, enabled=True, nonce=0, deadline=1),
         lambda c: c.delegate_digest(PSEUDONYM, d, True, 0, 1)),
    ]


@pytest.mark.parametrize("index", range(4), ids=["bind", "grant", "revoke", "delegate"])
def test_python_digest_equals_contract_and_eth_account_digest(world, index):
    message, on_chain = _messages(world)[index]
    ours = eip712.digest(message, chain_id=chain_id(), verifying_contract=world.consent.address)
    assert ours == on_chain(world.consent)
    typed = eip712.typed_data(message, chain_id=chain_id(), verifying_contract=world.consent.address)
    assert ours == _hash_eip191_message(encode_typed_data(full_message=typed))


def test_eip712_refuses_malformed_values():
    from teleledger.core.errors import InvalidInput

    with pytest.raises(InvalidInput, match="validFrom: expected uint64"):
        eip712.GrantConsent(pseudonym=PSEUDONYM, grantee=GRANTEE, provision_hash=PROVISION,
                            valid_from=2**64, valid_until=0, nonce=0, deadline=0).struct_hash()
    with pytest.raises(InvalidInput, match="pseudonym: expected 32 bytes"):
        eip712.RevokeConsent(pseudonym=b"x", grantee=GRANTEE, provision_hash=PROVISION, nonce=0, deadline=0).struct_hash()


# ---- binding ------------------------------------------------------------------------------------

def test_an_operator_binds_a_patient_with_the_patients_signature(world):
    world.bind()
    assert names(world.consent) == ["PatientBound"]
    assert world.consent.signer_of(PSEUDONYM) == world.patient.address
    assert world.consent.pseudonym_of(world.patient.address) == PSEUDONYM
    assert world.consent.nonces(PSEUDONYM) == 1


def test_only_an_operator_binds(world):
    msg = eip712.BindPatient(pseudonym=PSEUDONYM, signer=world.patient.address, nonce=0, deadline=FAR)
    with boa.env.prank(world.doctor), boa.reverts("consent: not an operator of the organization"):
        world.consent.bind_patient(ORG, PSEUDONYM, world.patient.address, FAR, *sign(world.patient, msg, world.consent))


def test_an_operator_cannot_bind_a_key_without_its_signature(world):
    msg = eip712.BindPatient(pseudonym=PSEUDONYM, signer=world.patient.address, nonce=0, deadline=FAR)
    with boa.env.prank(world.operator), boa.reverts("consent: invalid signature"):
        world.consent.bind_patient(ORG, PSEUDONYM, world.patient.address, FAR, *sign(world.stranger, msg, world.consent))


def test_a_patient_is_bound_once(world):
    world.bind()
    with boa.reverts("consent: patient already bound"):
        world.bind(account=world.stranger)
    with boa.reverts("consent: signer already bound"):
        world.bind(pseudonym=b"\x09" * 32)


# ---- grant / revoke by signature ------------------------------------------------------------------

def test_a_relayed_signature_grants_consent(world):
    world.bind()
    msg = world.grant_msg(valid_until=FAR)
    relayer = boa.env.generate_address()
    with boa.env.prank(relayer):
        world.consent.grant_by_sig(PSEUDONYM, GRANTEE, PROVISION, 0, FAR, FAR, *sign(world.patient, msg, world.consent))
    (log,) = world.consent.get_logs()
    assert (log.pseudonym, log.grantee, log.provision_hash, log.valid_until, log.by) == (
        PSEUDONYM, GRANTEE, PROVISION, FAR, relayer,
    )
    assert world.consent.is_active(PSEUDONYM, GRANTEE, PROVISION)
    assert world.consent.nonces(PSEUDONYM) == 2


def test_a_signature_works_once(world):
    world.bind()
    sig = sign(world.patient, world.grant_msg(), world.consent)
    world.consent.grant_by_sig(PSEUDONYM, GRANTEE, PROVISION, 0, 0, FAR, *sig)
    with boa.reverts("consent: invalid signature"):
        world.consent.grant_by_sig(PSEUDONYM, GRANTEE, PROVISION, 0, 0, FAR, *sig)


def test_an_expired_signature_is_refused(world):
    world.bind()
    deadline = boa.env.timestamp + 60
    sig = sign(world.patient, world.grant_msg(deadline=deadline), world.consent)
    boa.env.time_travel(seconds=61)
    with boa.reverts("consent: signature expired"):
        world.consent.grant_by_sig(PSEUDONYM, GRANTEE, PROVISION, 0, 0, deadline, *sig)


def test_a_stranger_signature_is_refused(world):
    world.bind()
    with boa.reverts("consent: invalid signature"):
        world.consent.grant_by_sig(PSEUDONYM, GRANTEE, PROVISION, 0, 0, FAR, *sign(world.stranger, world.grant_msg(), world.consent))


def test_a_signature_over_other_terms_is_refused(world):
    world.bind()
    sig = sign(world.patient, world.grant_msg(valid_until=100), world.consent)
    with boa.reverts("consent: invalid signature"):
        world.consent.grant_by_sig(PSEUDONYM, GRANTEE, PROVISION, 0, 0, FAR, *sig)


def test_the_high_s_twin_of_a_signature_is_refused(world):
    world.bind()
    v, r, s = sign(world.patient, world.grant_msg(), world.consent)
    twin_s = (SECP256K1_N - int.from_bytes(s, "big")).to_bytes(32, "big")
    with boa.reverts("consent: invalid signature"):
        world.consent.grant_by_sig(PSEUDONYM, GRANTEE, PROVISION, 0, 0, FAR, 55 - v, r, twin_s)


def test_a_relayed_signature_revokes_consent(world):
    world.bind()
    world.consent.grant_by_sig(PSEUDONYM, GRANTEE, PROVISION, 0, 0, FAR, *sign(world.patient, world.grant_msg(), world.consent))
    msg = eip712.RevokeConsent(pseudonym=PSEUDONYM, grantee=GRANTEE, provision_hash=PROVISION,
                               nonce=world.consent.nonces(PSEUDONYM), deadline=FAR)
    world.consent.revoke_by_sig(PSEUDONYM, GRANTEE, PROVISION, FAR, *sign(world.patient, msg, world.consent))
    assert names(world.consent) == ["ConsentRevoked"]
    assert not world.consent.is_active(PSEUDONYM, GRANTEE, PROVISION)
    assert world.consent.consent_of(PSEUDONYM, GRANTEE, PROVISION).granted is False


def test_signed_actions_for_an_unbound_pseudonym_are_refused(world):
    with boa.reverts("consent: unknown patient"):
        world.consent.grant_by_sig(PSEUDONYM, GRANTEE, PROVISION, 0, 0, FAR, 27, b"\x01" * 32, b"\x01" * 32)


# ---- direct calls and delegates -------------------------------------------------------------------

def test_the_patient_and_their_delegate_act_directly_but_a_stranger_cannot(world):
    world.bind()
    with boa.env.prank(world.patient.address):
        world.consent.set_delegate(PSEUDONYM, world.delegate, True)
    assert names(world.consent) == ["DelegateSet"]
    with boa.env.prank(world.delegate):
        world.consent.grant(PSEUDONYM, GRANTEE, PROVISION, 0, 0)
    with boa.env.prank(world.doctor), boa.reverts("consent: not the patient or a delegate"):
        world.consent.revoke(PSEUDONYM, GRANTEE, PROVISION)
    with boa.env.prank(world.patient.address):
        world.consent.revoke(PSEUDONYM, GRANTEE, PROVISION)
        with boa.reverts("consent: not granted"):
            world.consent.revoke(PSEUDONYM, GRANTEE, PROVISION)


def test_a_delegate_cannot_appoint_delegates(world):
    world.bind()
    with boa.env.prank(world.patient.address):
        world.consent.set_delegate(PSEUDONYM, world.delegate, True)
    with boa.env.prank(world.delegate), boa.reverts("consent: not the patient"):
        world.consent.set_delegate(PSEUDONYM, world.doctor, True)


def test_a_delegate_is_appointed_by_a_relayed_signature(world):
    world.bind()
    msg = eip712.SetDelegate(pseudonym=PSEUDONYM, delegate=world.delegate, enabled=True,
                             nonce=world.consent.nonces(PSEUDONYM), deadline=FAR)
    world.consent.set_delegate_by_sig(PSEUDONYM, world.delegate, True, FAR, *sign(world.patient, msg, world.consent))
    assert world.consent.is_delegate(PSEUDONYM, world.delegate)


def _appoint(world, delegate, enabled):
    msg = eip712.SetDelegate(pseudonym=PSEUDONYM, delegate=delegate, enabled=enabled,
                             nonce=world.consent.nonces(PSEUDONYM), deadline=FAR)
    world.consent.set_delegate_by_sig(PSEUDONYM, delegate, enabled, FAR, *sign(world.patient, msg, world.consent))


def _revoke_msg(world):
    return eip712.RevokeConsent(pseudonym=PSEUDONYM, grantee=GRANTEE, provision_hash=PROVISION,
                                nonce=world.consent.nonces(PSEUDONYM), deadline=FAR)


def test_a_delegates_relayed_signature_grants_and_revokes_for_the_patient(world):
    world.bind()
    _appoint(world, world.delegate, True)
    relayer = boa.env.generate_address()
    with boa.env.prank(relayer):
        world.consent.grant_by_sig(PSEUDONYM, GRANTEE, PROVISION, 0, 0, FAR,
                                   *sign(world.delegate_account, world.grant_msg(), world.consent))
    assert names(world.consent) == ["ConsentGranted"]
    assert world.consent.is_active(PSEUDONYM, GRANTEE, PROVISION)
    with boa.env.prank(relayer):
        world.consent.revoke_by_sig(PSEUDONYM, GRANTEE, PROVISION, FAR,
                                    *sign(world.delegate_account, _revoke_msg(world), world.consent))
    assert names(world.consent) == ["ConsentRevoked"]
    assert not world.consent.is_active(PSEUDONYM, GRANTEE, PROVISION)
    # each signed action used the patient's one nonce: bind, appoint, grant, revoke
    assert world.consent.nonces(PSEUDONYM) == 4


def test_a_removed_delegates_signature_is_refused(world):
    world.bind()
    _appoint(world, world.delegate, True)
    world.consent.grant_by_sig(PSEUDONYM, GRANTEE, PROVISION, 0, 0, FAR,
                               *sign(world.patient, world.grant_msg(), world.consent))
    # signed while still a delegate, relayed after the removal: refused all the same
    revoke_sig = sign(world.delegate_account, _revoke_msg(world), world.consent)
    _appoint(world, world.delegate, False)
    with boa.reverts("consent: invalid signature"):
        world.consent.revoke_by_sig(PSEUDONYM, GRANTEE, PROVISION, FAR, *revoke_sig)
    with boa.reverts("consent: invalid signature"):
        world.consent.revoke_by_sig(PSEUDONYM, GRANTEE, PROVISION, FAR,
                                    *sign(world.delegate_account, _revoke_msg(world), world.consent))
    with boa.reverts("consent: invalid signature"):
        world.consent.grant_by_sig(PSEUDONYM, GRANTEE, PROVISION, 0, 0, FAR,
                                   *sign(world.delegate_account, world.grant_msg(), world.consent))
    assert world.consent.is_active(PSEUDONYM, GRANTEE, PROVISION)


def test_a_strangers_signature_neither_grants_nor_revokes_while_a_delegate_exists(world):
    world.bind()
    _appoint(world, world.delegate, True)
    world.consent.grant_by_sig(PSEUDONYM, GRANTEE, PROVISION, 0, 0, FAR,
                               *sign(world.patient, world.grant_msg(), world.consent))
    with boa.reverts("consent: invalid signature"):
        world.consent.revoke_by_sig(PSEUDONYM, GRANTEE, PROVISION, FAR,
                                    *sign(world.stranger, _revoke_msg(world), world.consent))
    with boa.reverts("consent: invalid signature"):
        world.consent.grant_by_sig(PSEUDONYM, GRANTEE, PROVISION, 0, 0, FAR,
                                   *sign(world.stranger, world.grant_msg(), world.consent))


def test_a_delegate_of_one_patient_cannot_sign_for_another(world):
    world.bind()
    _appoint(world, world.delegate, True)
    other = b"\x0b" * 32
    world.bind(pseudonym=other, account=world.stranger)
    msg = eip712.GrantConsent(pseudonym=other, grantee=GRANTEE, provision_hash=PROVISION, valid_from=0,
                              valid_until=0, nonce=world.consent.nonces(other), deadline=FAR)
    with boa.reverts("consent: invalid signature"):
        world.consent.grant_by_sig(other, GRANTEE, PROVISION, 0, 0, FAR,
                                   *sign(world.delegate_account, msg, world.consent))


def test_a_delegates_signature_cannot_appoint_or_remove_delegates(world):
    world.bind()
    _appoint(world, world.delegate, True)
    for target, enabled in ((world.stranger.address, True), (world.delegate, False)):
        msg = eip712.SetDelegate(pseudonym=PSEUDONYM, delegate=target, enabled=enabled,
                                 nonce=world.consent.nonces(PSEUDONYM), deadline=FAR)
        with boa.reverts("consent: invalid signature"):
            world.consent.set_delegate_by_sig(PSEUDONYM, target, enabled, FAR,
                                              *sign(world.delegate_account, msg, world.consent))
    assert world.consent.is_delegate(PSEUDONYM, world.delegate)
    assert not world.consent.is_delegate(PSEUDONYM, world.stranger.address)


def test_a_consent_is_active_only_inside_its_period(world):
    world.bind()
    now = boa.env.timestamp
    with boa.env.prank(world.patient.address):
        world.consent.grant(PSEUDONYM, GRANTEE, PROVISION, now + 100, now + 200)
        assert not world.consent.is_active(PSEUDONYM, GRANTEE, PROVISION)
        boa.env.time_travel(seconds=100)
        assert world.consent.is_active(PSEUDONYM, GRANTEE, PROVISION)
        boa.env.time_travel(seconds=100)
        assert not world.consent.is_active(PSEUDONYM, GRANTEE, PROVISION)
        with boa.reverts("consent: bad period"):
            world.consent.grant(PSEUDONYM, GRANTEE, PROVISION, 10, 10)
        with boa.reverts("consent: empty provision hash"):
            world.consent.grant(PSEUDONYM, GRANTEE, b"\x00" * 32, 0, 0)


# ---- stateful: only the patient or their delegate changes the patient's consent -----------------

GRANTEES = [b"G".rjust(32, b"\x00"), b"H".rjust(32, b"\x00")]


class ConsentMachine(RuleBasedStateMachine):
    @initialize()
    def deploy(self):
        self._anchor = boa.env.anchor()
        self._anchor.__enter__()
        self.w = World()
        self.w.bind()
        self.callers = {
            "patient": self.w.patient.address, "delegate": self.w.delegate,
            "doctor": self.w.doctor, "operator": self.w.operator, "stranger": self.w.stranger.address,
        }
        self.delegates: set[str] = set()
        self.granted: dict[bytes, bool] = {g: False for g in GRANTEES}

    def teardown(self):
        if hasattr(self, "_anchor"):
            self._anchor.__exit__(None, None, None)

    def _apply(self, grant: bool, grantee: bytes, allowed: bool, call):
        if not allowed:
            return
        if not grant and not self.granted[grantee]:
            with boa.reverts("consent: not granted"):
                call()
            return
        call()
        self.granted[grantee] = grant

    @rule(who=st.sampled_from(["patient", "delegate", "doctor", "operator", "stranger"]),
          grant=st.booleans(), grantee=st.sampled_from(GRANTEES))
    def direct(self, who, grant, grantee):
        allowed = who == "patient" or (who == "delegate" and "delegate" in self.delegates)
        c = self.w.consent

        def call():
            with boa.env.prank(self.callers[who]):
                if grant:
                    c.grant(PSEUDONYM, grantee, PROVISION, 0, 0)
                else:
                    c.revoke(PSEUDONYM, grantee, PROVISION)

        if not allowed:
            with boa.reverts("consent: not the patient or a delegate"):
                call()
        self._apply(grant, grantee, allowed, call)

    def _account(self, signer):
        return {"patient": self.w.patient, "delegate": self.w.delegate_account, "stranger": self.w.stranger}[signer]

    @rule(signer=st.sampled_from(["patient", "delegate", "stranger"]), grant=st.booleans(),
          grantee=st.sampled_from(GRANTEES), relayer=st.sampled_from(["doctor", "stranger", "operator"]))
    def by_signature(self, signer, grant, grantee, relayer):
        account = self._account(signer)
        c, nonce = self.w.consent, self.w.consent.nonces(PSEUDONYM)
        if grant:
            msg = eip712.GrantConsent(pseudonym=PSEUDONYM, grantee=grantee, provision_hash=PROVISION,
                                      valid_from=0, valid_until=0, nonce=nonce, deadline=FAR)
        else:
            msg = eip712.RevokeConsent(pseudonym=PSEUDONYM, grantee=grantee, provision_hash=PROVISION,
                                       nonce=nonce, deadline=FAR)
        sig = sign(account, msg, c)

        def call():
            with boa.env.prank(self.callers[relayer]):
                if grant:
                    c.grant_by_sig(PSEUDONYM, grantee, PROVISION, 0, 0, FAR, *sig)
                else:
                    c.revoke_by_sig(PSEUDONYM, grantee, PROVISION, FAR, *sig)

        allowed = signer == "patient" or (signer == "delegate" and "delegate" in self.delegates)
        if not allowed:
            with boa.reverts("consent: invalid signature"):
                call()
        self._apply(grant, grantee, allowed, call)

    @rule(who=st.sampled_from(["patient", "delegate", "stranger"]), enabled=st.booleans())
    def appoint_delegate(self, who, enabled):
        with boa.env.prank(self.callers[who]):
            if who != "patient":
                with boa.reverts("consent: not the patient"):
                    self.w.consent.set_delegate(PSEUDONYM, self.w.delegate, enabled)
                return
            self.w.consent.set_delegate(PSEUDONYM, self.w.delegate, enabled)
        (self.delegates.add if enabled else self.delegates.discard)("delegate")

    @rule(signer=st.sampled_from(["patient", "delegate", "stranger"]), enabled=st.booleans())
    def appoint_delegate_by_signature(self, signer, enabled):
        c = self.w.consent
        msg = eip712.SetDelegate(pseudonym=PSEUDONYM, delegate=self.w.delegate, enabled=enabled,
                                 nonce=c.nonces(PSEUDONYM), deadline=FAR)
        sig = sign(self._account(signer), msg, c)
        if signer != "patient":  # only the patient manages delegates, a delegate included
            with boa.reverts("consent: invalid signature"):
                c.set_delegate_by_sig(PSEUDONYM, self.w.delegate, enabled, FAR, *sig)
            return
        c.set_delegate_by_sig(PSEUDONYM, self.w.delegate, enabled, FAR, *sig)
        (self.delegates.add if enabled else self.delegates.discard)("delegate")

    @invariant()
    def chain_consent_equals_model(self):
        if not hasattr(self, "w"):
            return
        for grantee in GRANTEES:
            assert self.w.consent.is_active(PSEUDONYM, grantee, PROVISION) == self.granted[grantee]
        assert self.w.consent.is_delegate(PSEUDONYM, self.w.delegate) == ("delegate" in self.delegates)


ConsentMachine.TestCase.settings = settings(max_examples=30, stateful_step_count=20, deadline=None)
test_only_the_patient_or_a_delegate_changes_consent = ConsentMachine.TestCase
