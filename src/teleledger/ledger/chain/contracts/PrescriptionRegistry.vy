# pragma version ~=0.4.3
# pragma evm-version cancun
# pragma optimize gas
"""
@title PrescriptionRegistry
@notice E-prescriptions shared by prescribers and pharmacies of the consortium: a practitioner
        issues, pharmacists dispense (partial fills and refills), the prescriber cancels. The
        rules below hold in the contract itself, so no organization's software can over-dispense,
        dispense an expired or cancelled prescription, or dispense without a pharmacist.
@dev    Quantities. A prescription allows `1 + refills` fills of `quantity_per_fill` units each.
        Every dispense takes `0 < quantity <= quantity_per_fill - dispensed_in_fill` units from
        the current fill (partial fills; one dispense never spans two fills); the dispense that
        completes a fill moves on to the next one (`fills_completed += 1`,
        `dispensed_in_fill = 0`). The prescription is complete when `fills_completed ==
        1 + refills`; so the units ever dispensed never exceed `quantity_per_fill * (1 + refills)`.
        `refills_remaining` (in `status`) counts the refills not yet begun: `refills` until the
        second fill starts, then one less for each further fill that starts.
        Fill numbers in events are 1-based: fill 1 is the original, fill k is refill k - 1.
        Who may do what (roles come from ParticipantRegistry.has_role):
          * issue: an address with ROLE_PRACTITIONER in `prescriber_org`; it is recorded as the
            prescriber. `rx_hash` is unique for good (a cancelled hash is never reissued).
          * dispense: an address with ROLE_PHARMACIST in `pharmacy_org`, a registered
            organization, checked at the time of dispensing (a removed pharmacist stops at once).
            The prescriber's later loss of a role does not void an issued prescription.
          * cancel: the prescriber, or an ORG_ADMIN of the prescriber's organization (so a
            prescription outlives the departure or lost key of its prescriber without being
            uncancellable). Cancelling only ever takes rights away.
        Expiry: dispensing is refused once `block.timestamp > expiry` (the expiry second itself
        is still valid); `issue` wants an expiry in the future.
        Idempotency: every dispense carries `dispense_ref` (the hash of the off-chain
        MedicationDispense), usable once per prescription, so a retried transaction whose first
        attempt did land is refused instead of dispensing twice.
        Quantities are uint64 so `quantity_per_fill * (1 + refills)` never overflows; refills
        are capped at MAX_REFILLS.
        No PHI: prescriptions are hashes, patients are pseudonyms, people are addresses.
"""

interface IParticipantRegistry:
    def has_role(org: bytes32, account: address, role: uint256) -> bool: view
    def is_organization(org: bytes32) -> bool: view

ROLE_PRACTITIONER: constant(uint256) = 1
ROLE_PHARMACIST: constant(uint256) = 2
ROLE_ORG_ADMIN: constant(uint256) = 16
MAX_REFILLS: public(constant(uint64)) = 99

struct Prescription:
    prescriber: address
    prescriber_org: bytes32
    patient_pseudonym: bytes32
    quantity_per_fill: uint64
    refills: uint64
    expiry: uint64
    issued_at: uint64
    fills_completed: uint64
    dispensed_in_fill: uint64
    cancelled: bool

struct Status:
    exists: bool
    prescriber: address
    prescriber_org: bytes32
    patient_pseudonym: bytes32
    quantity_per_fill: uint64
    refills: uint64
    expiry: uint64
    issued_at: uint64
    fills_completed: uint64
    dispensed_in_fill: uint64
    refills_remaining: uint64
    total_dispensed: uint256
    remaining: uint256
    cancelled: bool
    expired: bool
    completed: bool

event PrescriptionIssued:
    rx_hash: indexed(bytes32)
    prescriber_org: indexed(bytes32)
    patient_pseudonym: indexed(bytes32)
    prescriber: address
    quantity_per_fill: uint64
    refills: uint64
    expiry: uint64

event Dispensed:
    rx_hash: indexed(bytes32)
    pharmacy_org: indexed(bytes32)
    dispense_ref: indexed(bytes32)
    pharmacist: address
    quantity: uint64
    fill_number: uint64
    dispensed_in_fill: uint64
    refills_remaining: uint64
    remaining: uint256

event PrescriptionCancelled:
    rx_hash: indexed(bytes32)
    prescriber_org: indexed(bytes32)
    by: indexed(address)
    remaining: uint256

PARTICIPANTS: public(immutable(IParticipantRegistry))

prescriptions: HashMap[bytes32, Prescription]
dispense_ref_used: public(HashMap[bytes32, HashMap[bytes32, bool]])


@deploy
def __init__(participants: address):
    assert participants != empty(address), "prescriptions: zero address"
    PARTICIPANTS = IParticipantRegistry(participants)


# ---- views ------------------------------------------------------------------------------------

@external
@view
def status(rx_hash: bytes32) -> Status:
    """@notice Everything known about `rx_hash`; `exists` is False (and the rest zero) when unknown."""
    rx: Prescription = self.prescriptions[rx_hash]
    if rx.prescriber == empty(address):
        return empty(Status)
    return Status(
        exists=True,
        prescriber=rx.prescriber,
        prescriber_org=rx.prescriber_org,
        patient_pseudonym=rx.patient_pseudonym,
        quantity_per_fill=rx.quantity_per_fill,
        refills=rx.refills,
        expiry=rx.expiry,
        issued_at=rx.issued_at,
        fills_completed=rx.fills_completed,
        dispensed_in_fill=rx.dispensed_in_fill,
        refills_remaining=self._refills_remaining(rx),
        total_dispensed=self._total_dispensed(rx),
        remaining=self._remaining(rx),
        cancelled=rx.cancelled,
        expired=block.timestamp > convert(rx.expiry, uint256),
        completed=self._completed(rx),
    )


@external
@view
def is_dispensable(rx_hash: bytes32) -> bool:
    """@notice Issued, not cancelled, not expired and not complete (pharmacist aside)."""
    rx: Prescription = self.prescriptions[rx_hash]
    return (
        rx.prescriber != empty(address)
        and not rx.cancelled
        and block.timestamp <= convert(rx.expiry, uint256)
        and not self._completed(rx)
    )


# ---- state changes ----------------------------------------------------------------------------

@external
def issue(
    rx_hash: bytes32, prescriber_org: bytes32, patient_pseudonym: bytes32,
    quantity_per_fill: uint64, refills: uint64, expiry: uint64
):
    """@notice A practitioner of `prescriber_org` issues prescription `rx_hash`."""
    assert staticcall PARTICIPANTS.has_role(prescriber_org, msg.sender, ROLE_PRACTITIONER), "prescriptions: not a practitioner of the organization"
    assert rx_hash != empty(bytes32), "prescriptions: empty prescription hash"
    assert patient_pseudonym != empty(bytes32), "prescriptions: empty patient pseudonym"
    assert quantity_per_fill > 0, "prescriptions: quantity must be positive"
    assert refills <= MAX_REFILLS, "prescriptions: too many refills"
    assert convert(expiry, uint256) > block.timestamp, "prescriptions: expiry must be in the future"
    assert self.prescriptions[rx_hash].prescriber == empty(address), "prescriptions: prescription exists"
    self.prescriptions[rx_hash] = Prescription(
        prescriber=msg.sender,
        prescriber_org=prescriber_org,
        patient_pseudonym=patient_pseudonym,
        quantity_per_fill=quantity_per_fill,
        refills=refills,
        expiry=expiry,
        issued_at=convert(block.timestamp, uint64),
        fills_completed=0,
        dispensed_in_fill=0,
        cancelled=False,
    )
    log PrescriptionIssued(
        rx_hash=rx_hash, prescriber_org=prescriber_org, patient_pseudonym=patient_pseudonym,
        prescriber=msg.sender, quantity_per_fill=quantity_per_fill, refills=refills, expiry=expiry,
    )


@external
def dispense(rx_hash: bytes32, pharmacy_org: bytes32, quantity: uint64, dispense_ref: bytes32) -> uint64:
    """@notice A pharmacist of `pharmacy_org` dispenses `quantity` units; returns the fill number."""
    assert staticcall PARTICIPANTS.is_organization(pharmacy_org), "prescriptions: unknown pharmacy organization"
    assert staticcall PARTICIPANTS.has_role(pharmacy_org, msg.sender, ROLE_PHARMACIST), "prescriptions: not a pharmacist of the organization"
    rx: Prescription = self._existing(rx_hash)
    assert not rx.cancelled, "prescriptions: prescription cancelled"
    assert block.timestamp <= convert(rx.expiry, uint256), "prescriptions: prescription expired"
    assert not self._completed(rx), "prescriptions: prescription fully dispensed"
    assert quantity > 0, "prescriptions: quantity must be positive"
    assert quantity <= rx.quantity_per_fill - rx.dispensed_in_fill, "prescriptions: quantity exceeds what remains of the fill"
    assert dispense_ref != empty(bytes32), "prescriptions: empty dispense reference"
    assert not self.dispense_ref_used[rx_hash][dispense_ref], "prescriptions: dispense already recorded"
    self.dispense_ref_used[rx_hash][dispense_ref] = True
    fill_number: uint64 = rx.fills_completed + 1
    in_fill: uint64 = rx.dispensed_in_fill + quantity
    if in_fill == rx.quantity_per_fill:
        rx.fills_completed = fill_number
        rx.dispensed_in_fill = 0
    else:
        rx.dispensed_in_fill = in_fill
    self.prescriptions[rx_hash] = rx
    log Dispensed(
        rx_hash=rx_hash, pharmacy_org=pharmacy_org, dispense_ref=dispense_ref, pharmacist=msg.sender,
        quantity=quantity, fill_number=fill_number, dispensed_in_fill=in_fill,
        refills_remaining=self._refills_remaining(rx), remaining=self._remaining(rx),
    )
    return fill_number


@external
def cancel(rx_hash: bytes32):
    """@notice The prescriber (or an admin of the prescriber's organization) cancels `rx_hash`."""
    rx: Prescription = self._existing(rx_hash)
    assert msg.sender == rx.prescriber or staticcall PARTICIPANTS.has_role(rx.prescriber_org, msg.sender, ROLE_ORG_ADMIN), "prescriptions: not the prescriber"
    assert not rx.cancelled, "prescriptions: prescription cancelled"
    assert not self._completed(rx), "prescriptions: prescription fully dispensed"
    self.prescriptions[rx_hash].cancelled = True
    log PrescriptionCancelled(rx_hash=rx_hash, prescriber_org=rx.prescriber_org, by=msg.sender, remaining=self._remaining(rx))


# ---- internals --------------------------------------------------------------------------------

@internal
@view
def _existing(rx_hash: bytes32) -> Prescription:
    rx: Prescription = self.prescriptions[rx_hash]
    assert rx.prescriber != empty(address), "prescriptions: unknown prescription"
    return rx


@internal
@pure
def _completed(rx: Prescription) -> bool:
    return rx.fills_completed == rx.refills + 1


@internal
@pure
def _total_dispensed(rx: Prescription) -> uint256:
    return convert(rx.quantity_per_fill, uint256) * convert(rx.fills_completed, uint256) + convert(rx.dispensed_in_fill, uint256)


@internal
@pure
def _remaining(rx: Prescription) -> uint256:
    return convert(rx.quantity_per_fill, uint256) * convert(rx.refills + 1, uint256) - self._total_dispensed(rx)


@internal
@pure
def _refills_remaining(rx: Prescription) -> uint64:
    started: uint64 = rx.fills_completed
    if rx.dispensed_in_fill > 0:
        started += 1
    if started <= 1:
        return rx.refills
    return rx.refills + 1 - started
