# pragma version ~=0.4.3
# pragma evm-version cancun
# pragma optimize gas
"""
@title ConsentRegistry
@notice Patient consent grants and revocations, keyed by (patient pseudonym, grantee, hash of the
        FHIR Consent provision), each with a validity period.
@dev    Who the patient is on chain:
          * a patient is a bytes32 pseudonym (keyed hash computed off chain; never PHI);
          * the pseudonym is bound once to a patient signing address by an OPERATOR of an
            organization in ParticipantRegistry (the platform vouches that the pseudonym is this
            patient) AND by the patient's own EIP-712 `BindPatient` signature (the patient proves
            control of the key and agrees). Neither alone can bind: an operator cannot bind a key
            the patient does not hold, a key holder cannot claim someone else's pseudonym.
        Who may grant/revoke/set delegates for a pseudonym:
          * the bound signer or one of the patient's delegates calling directly (delegates may
            grant and revoke, only the patient manages delegates), or
          * anyone relaying an EIP-712 signature (the platform pays gas; patients need no funds):
            the bound signer's for every action, or an active delegate's for GrantConsent and
            RevokeConsent (a parent, guardian or caregiver acting for the patient; SetDelegate
            stays the bound signer's alone). Each signature carries the patient's current nonce
            and a deadline; every signed action consumes the nonce, so a signature works at most
            once, and a delegate removed before their signature is relayed can no longer use it.
        EIP-712 domain: name "TeleledgerConsent", version "1", chainId, verifyingContract.
        The Python side is teleledger.ledger.chain.eip712; tests check both give one digest.
        Key rotation and lost-key recovery are not in this version.
"""

interface IParticipantRegistry:
    def has_role(org: bytes32, account: address, role: uint256) -> bool: view

ROLE_OPERATOR: constant(uint256) = 32
UINT64_MASK: constant(uint256) = 2**64 - 1
# secp256k1n / 2: reject the high-s twin of every signature (EIP-2)
MAX_S: constant(uint256) = 57896044618658097711785492504343953926418782139537452191302581570759080747168

DOMAIN_TYPE_HASH: constant(bytes32) = keccak256(
    "EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
)
NAME_HASH: constant(bytes32) = keccak256("TeleledgerConsent")
VERSION_HASH: constant(bytes32) = keccak256("1")
BIND_TYPE_HASH: constant(bytes32) = keccak256(
    "BindPatient(bytes32 pseudonym,address signer,uint256 nonce,uint256 deadline)"
)
GRANT_TYPE_HASH: constant(bytes32) = keccak256(
    "GrantConsent(bytes32 pseudonym,bytes32 grantee,bytes32 provisionHash,uint64 validFrom,uint64 validUntil,uint256 nonce,uint256 deadline)"
)
REVOKE_TYPE_HASH: constant(bytes32) = keccak256(
    "RevokeConsent(bytes32 pseudonym,bytes32 grantee,bytes32 provisionHash,uint256 nonce,uint256 deadline)"
)
DELEGATE_TYPE_HASH: constant(bytes32) = keccak256(
    "SetDelegate(bytes32 pseudonym,address delegate,bool enabled,uint256 nonce,uint256 deadline)"
)

struct Consent:
    granted: bool
    valid_from: uint64
    valid_until: uint64  # exclusive; 0 = open-ended
    updated_at: uint64

event PatientBound:
    pseudonym: indexed(bytes32)
    signer: indexed(address)
    org: indexed(bytes32)
    operator: address

event DelegateSet:
    pseudonym: indexed(bytes32)
    delegate: indexed(address)
    enabled: bool
    by: address

event ConsentGranted:
    pseudonym: indexed(bytes32)
    grantee: indexed(bytes32)
    provision_hash: indexed(bytes32)
    valid_from: uint64
    valid_until: uint64
    by: address

event ConsentRevoked:
    pseudonym: indexed(bytes32)
    grantee: indexed(bytes32)
    provision_hash: indexed(bytes32)
    by: address

PARTICIPANTS: public(immutable(IParticipantRegistry))

signer_of: public(HashMap[bytes32, address])
pseudonym_of: public(HashMap[address, bytes32])
is_delegate: public(HashMap[bytes32, HashMap[address, bool]])
nonces: public(HashMap[bytes32, uint256])
# one storage slot per consent (key: _key(...)): granted (bit 192) | updated_at (bits 128-191) |
# valid_until (bits 64-127) | valid_from (bits 0-63). Packed by hand because Vyper gives every
# struct member its own slot: four slots cost four SSTOREs and four storage-trie leaves per
# grant, one costs one. Read it through consent_of / is_active.
_consents: HashMap[bytes32, uint256]


@deploy
def __init__(participants: address):
    assert participants != empty(address), "consent: zero address"
    PARTICIPANTS = IParticipantRegistry(participants)


# ---- views ------------------------------------------------------------------------------------

@external
@view
def DOMAIN_SEPARATOR() -> bytes32:
    return self._domain_separator()


@external
@view
def consent_key(pseudonym: bytes32, grantee: bytes32, provision_hash: bytes32) -> bytes32:
    return self._key(pseudonym, grantee, provision_hash)


@external
@view
def consent_of(pseudonym: bytes32, grantee: bytes32, provision_hash: bytes32) -> Consent:
    return self._unpack(self._consents[self._key(pseudonym, grantee, provision_hash)])


@external
@view
def is_active(pseudonym: bytes32, grantee: bytes32, provision_hash: bytes32) -> bool:
    """@notice Granted, not revoked, and block.timestamp inside [valid_from, valid_until)."""
    c: Consent = self._unpack(self._consents[self._key(pseudonym, grantee, provision_hash)])
    if not c.granted or block.timestamp < convert(c.valid_from, uint256):
        return False
    return c.valid_until == 0 or block.timestamp < convert(c.valid_until, uint256)


@external
@view
def bind_digest(pseudonym: bytes32, signer: address, nonce: uint256, deadline: uint256) -> bytes32:
    return self._digest(keccak256(abi_encode(BIND_TYPE_HASH, pseudonym, signer, nonce, deadline)))


@external
@view
def grant_digest(
    pseudonym: bytes32, grantee: bytes32, provision_hash: bytes32, valid_from: uint64,
    valid_until: uint64, nonce: uint256, deadline: uint256
) -> bytes32:
    return self._digest(self._grant_struct_hash(pseudonym, grantee, provision_hash, valid_from, valid_until, nonce, deadline))


@external
@view
def revoke_digest(
    pseudonym: bytes32, grantee: bytes32, provision_hash: bytes32, nonce: uint256, deadline: uint256
) -> bytes32:
    return self._digest(keccak256(abi_encode(REVOKE_TYPE_HASH, pseudonym, grantee, provision_hash, nonce, deadline)))


@external
@view
def delegate_digest(
    pseudonym: bytes32, delegate: address, enabled: bool, nonce: uint256, deadline: uint256
) -> bytes32:
    return self._digest(keccak256(abi_encode(DELEGATE_TYPE_HASH, pseudonym, delegate, enabled, nonce, deadline)))


# ---- binding ----------------------------------------------------------------------------------

@external
def bind_patient(
    org: bytes32, pseudonym: bytes32, signer: address, deadline: uint256,
    v: uint8, r: bytes32, s: bytes32
):
    """@notice An operator of `org` binds `pseudonym` to `signer`, countersigned by `signer`."""
    assert staticcall PARTICIPANTS.has_role(org, msg.sender, ROLE_OPERATOR), "consent: not an operator of the organization"
    assert pseudonym != empty(bytes32), "consent: empty pseudonym"
    assert signer != empty(address), "consent: zero address"
    assert self.signer_of[pseudonym] == empty(address), "consent: patient already bound"
    assert self.pseudonym_of[signer] == empty(bytes32), "consent: signer already bound"
    nonce: uint256 = self.nonces[pseudonym]
    digest: bytes32 = self._digest(keccak256(abi_encode(BIND_TYPE_HASH, pseudonym, signer, nonce, deadline)))
    self._check_signature(digest, signer, deadline, v, r, s)
    self.nonces[pseudonym] = nonce + 1
    self.signer_of[pseudonym] = signer
    self.pseudonym_of[signer] = pseudonym
    log PatientBound(pseudonym=pseudonym, signer=signer, org=org, operator=msg.sender)


# ---- delegates --------------------------------------------------------------------------------

@external
def set_delegate(pseudonym: bytes32, delegate: address, enabled: bool):
    """@notice The patient's own address adds or removes a delegate."""
    self._require_bound(pseudonym)
    assert msg.sender == self.signer_of[pseudonym], "consent: not the patient"
    self._set_delegate(pseudonym, delegate, enabled)


@external
def set_delegate_by_sig(
    pseudonym: bytes32, delegate: address, enabled: bool, deadline: uint256,
    v: uint8, r: bytes32, s: bytes32
):
    self._require_bound(pseudonym)
    nonce: uint256 = self.nonces[pseudonym]
    digest: bytes32 = self._digest(keccak256(abi_encode(DELEGATE_TYPE_HASH, pseudonym, delegate, enabled, nonce, deadline)))
    self._check_signature(digest, self.signer_of[pseudonym], deadline, v, r, s)
    self.nonces[pseudonym] = nonce + 1
    self._set_delegate(pseudonym, delegate, enabled)


# ---- grant / revoke ---------------------------------------------------------------------------

@external
def grant(pseudonym: bytes32, grantee: bytes32, provision_hash: bytes32, valid_from: uint64, valid_until: uint64):
    """@notice The patient or a delegate grants directly."""
    self._require_patient_or_delegate(pseudonym)
    self._grant(pseudonym, grantee, provision_hash, valid_from, valid_until)


@external
def grant_by_sig(
    pseudonym: bytes32, grantee: bytes32, provision_hash: bytes32, valid_from: uint64,
    valid_until: uint64, deadline: uint256, v: uint8, r: bytes32, s: bytes32
):
    """@notice Anyone relays the EIP-712 GrantConsent signature of the patient or of a delegate."""
    self._require_bound(pseudonym)
    nonce: uint256 = self.nonces[pseudonym]
    digest: bytes32 = self._digest(self._grant_struct_hash(pseudonym, grantee, provision_hash, valid_from, valid_until, nonce, deadline))
    self._check_patient_or_delegate_signature(pseudonym, digest, deadline, v, r, s)
    self.nonces[pseudonym] = nonce + 1
    self._grant(pseudonym, grantee, provision_hash, valid_from, valid_until)


@external
def revoke(pseudonym: bytes32, grantee: bytes32, provision_hash: bytes32):
    """@notice The patient or a delegate revokes directly."""
    self._require_patient_or_delegate(pseudonym)
    self._revoke(pseudonym, grantee, provision_hash)


@external
def revoke_by_sig(
    pseudonym: bytes32, grantee: bytes32, provision_hash: bytes32, deadline: uint256,
    v: uint8, r: bytes32, s: bytes32
):
    """@notice Anyone relays the EIP-712 RevokeConsent signature of the patient or of a delegate."""
    self._require_bound(pseudonym)
    nonce: uint256 = self.nonces[pseudonym]
    digest: bytes32 = self._digest(keccak256(abi_encode(REVOKE_TYPE_HASH, pseudonym, grantee, provision_hash, nonce, deadline)))
    self._check_patient_or_delegate_signature(pseudonym, digest, deadline, v, r, s)
    self.nonces[pseudonym] = nonce + 1
    self._revoke(pseudonym, grantee, provision_hash)


# ---- internals --------------------------------------------------------------------------------

@internal
@view
def _domain_separator() -> bytes32:
    # computed per call so a chain-id change (fork) invalidates old signatures
    return keccak256(abi_encode(DOMAIN_TYPE_HASH, NAME_HASH, VERSION_HASH, chain.id, self))


@internal
@view
def _digest(struct_hash: bytes32) -> bytes32:
    return keccak256(concat(x"1901", self._domain_separator(), struct_hash))


@internal
@pure
def _grant_struct_hash(
    pseudonym: bytes32, grantee: bytes32, provision_hash: bytes32, valid_from: uint64,
    valid_until: uint64, nonce: uint256, deadline: uint256
) -> bytes32:
    return keccak256(abi_encode(GRANT_TYPE_HASH, pseudonym, grantee, provision_hash, valid_from, valid_until, nonce, deadline))


@internal
@pure
def _key(pseudonym: bytes32, grantee: bytes32, provision_hash: bytes32) -> bytes32:
    return keccak256(abi_encode(pseudonym, grantee, provision_hash))


@internal
@view
def _recover(digest: bytes32, deadline: uint256, v: uint8, r: bytes32, s: bytes32) -> address:
    """@dev The signer of an unexpired, low-s signature; empty(address) when it does not recover."""
    assert block.timestamp <= deadline, "consent: signature expired"
    assert convert(s, uint256) <= MAX_S, "consent: invalid signature"
    return ecrecover(digest, v, r, s)


@internal
@view
def _check_signature(digest: bytes32, expected: address, deadline: uint256, v: uint8, r: bytes32, s: bytes32):
    recovered: address = self._recover(digest, deadline, v, r, s)
    assert recovered != empty(address) and recovered == expected, "consent: invalid signature"


@internal
@view
def _check_patient_or_delegate_signature(pseudonym: bytes32, digest: bytes32, deadline: uint256, v: uint8, r: bytes32, s: bytes32):
    # the zero address is never a delegate (_set_delegate refuses it), but a signature that does
    # not recover must not even get that far
    recovered: address = self._recover(digest, deadline, v, r, s)
    assert recovered != empty(address) and (
        recovered == self.signer_of[pseudonym] or self.is_delegate[pseudonym][recovered]
    ), "consent: invalid signature"


@internal
@view
def _require_bound(pseudonym: bytes32):
    assert self.signer_of[pseudonym] != empty(address), "consent: unknown patient"


@internal
@view
def _require_patient_or_delegate(pseudonym: bytes32):
    self._require_bound(pseudonym)
    assert msg.sender == self.signer_of[pseudonym] or self.is_delegate[pseudonym][msg.sender], "consent: not the patient or a delegate"


@internal
def _set_delegate(pseudonym: bytes32, delegate: address, enabled: bool):
    assert delegate != empty(address), "consent: zero address"
    assert delegate != self.signer_of[pseudonym], "consent: patient cannot be own delegate"
    self.is_delegate[pseudonym][delegate] = enabled
    log DelegateSet(pseudonym=pseudonym, delegate=delegate, enabled=enabled, by=msg.sender)


@internal
def _grant(pseudonym: bytes32, grantee: bytes32, provision_hash: bytes32, valid_from: uint64, valid_until: uint64):
    assert grantee != empty(bytes32), "consent: empty grantee"
    assert provision_hash != empty(bytes32), "consent: empty provision hash"
    assert valid_until == 0 or valid_until > valid_from, "consent: bad period"
    self._consents[self._key(pseudonym, grantee, provision_hash)] = self._pack(
        True, valid_from, valid_until, convert(block.timestamp, uint64)
    )
    log ConsentGranted(
        pseudonym=pseudonym, grantee=grantee, provision_hash=provision_hash,
        valid_from=valid_from, valid_until=valid_until, by=msg.sender,
    )


@internal
def _revoke(pseudonym: bytes32, grantee: bytes32, provision_hash: bytes32):
    key: bytes32 = self._key(pseudonym, grantee, provision_hash)
    c: Consent = self._unpack(self._consents[key])
    assert c.granted, "consent: not granted"
    self._consents[key] = self._pack(False, c.valid_from, c.valid_until, convert(block.timestamp, uint64))
    log ConsentRevoked(pseudonym=pseudonym, grantee=grantee, provision_hash=provision_hash, by=msg.sender)


@internal
@pure
def _pack(granted: bool, valid_from: uint64, valid_until: uint64, updated_at: uint64) -> uint256:
    word: uint256 = convert(valid_from, uint256) | (convert(valid_until, uint256) << 64) | (convert(updated_at, uint256) << 128)
    if granted:
        word = word | (1 << 192)
    return word


@internal
@pure
def _unpack(word: uint256) -> Consent:
    return Consent(
        granted=(word >> 192) & 1 == 1,
        valid_from=convert(word & UINT64_MASK, uint64),
        valid_until=convert((word >> 64) & UINT64_MASK, uint64),
        updated_at=convert((word >> 128) & UINT64_MASK, uint64),
    )
