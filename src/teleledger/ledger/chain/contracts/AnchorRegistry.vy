# pragma version ~=0.4.3
# pragma evm-version cancun
# pragma optimize gas
"""
@title AnchorRegistry
@notice Transparency-log checkpoints (C2SP tlog-checkpoint: origin, tree size, root hash)
        anchored on chain by the organization that runs the log.
@dev    Rules:
          * only an address with ROLE_OPERATOR in `org` (ParticipantRegistry) anchors for `org`;
          * the first anchor of an origin ties that origin to its organization for good;
          * tree sizes of one origin strictly increase: a log never goes backwards, and a second
            root for an already-anchored size is refused (it would be a split view; the off-chain
            verifier compares the anchored root with what the log serves).
        Every anchor is kept (`checkpoint_at`) so a verifier can pick the one matching a proof.
        The consistency proof between successive anchors is checked off chain
        (teleledger.ledger.log), never here: the chain only orders and timestamps them.
"""

interface IParticipantRegistry:
    def has_role(org: bytes32, account: address, role: uint256) -> bool: view

ROLE_OPERATOR: constant(uint256) = 32
MAX_ORIGIN: constant(uint256) = 128

struct Checkpoint:
    tree_size: uint64
    root_hash: bytes32
    anchored_at: uint64

event CheckpointAnchored:
    org: indexed(bytes32)
    origin_hash: indexed(bytes32)
    index: indexed(uint256)
    origin: String[MAX_ORIGIN]
    tree_size: uint64
    root_hash: bytes32
    by: address

PARTICIPANTS: public(immutable(IParticipantRegistry))

origin_owner: public(HashMap[bytes32, bytes32])
anchor_count: public(HashMap[bytes32, uint256])
checkpoints: HashMap[bytes32, HashMap[uint256, Checkpoint]]


@deploy
def __init__(participants: address):
    assert participants != empty(address), "anchors: zero address"
    PARTICIPANTS = IParticipantRegistry(participants)


@external
@pure
def origin_hash(origin: String[MAX_ORIGIN]) -> bytes32:
    return keccak256(origin)


@external
@view
def latest(origin: String[MAX_ORIGIN]) -> Checkpoint:
    """@notice The newest checkpoint of `origin` (all zero when none)."""
    h: bytes32 = keccak256(origin)
    n: uint256 = self.anchor_count[h]
    if n == 0:
        return empty(Checkpoint)
    return self.checkpoints[h][n - 1]


@external
@view
def checkpoint_at(origin: String[MAX_ORIGIN], index: uint256) -> Checkpoint:
    h: bytes32 = keccak256(origin)
    assert index < self.anchor_count[h], "anchors: no such checkpoint"
    return self.checkpoints[h][index]


@external
def anchor(org: bytes32, origin: String[MAX_ORIGIN], tree_size: uint64, root_hash: bytes32) -> uint256:
    """@notice Anchor a checkpoint of `origin` for `org`; returns its index."""
    assert staticcall PARTICIPANTS.has_role(org, msg.sender, ROLE_OPERATOR), "anchors: not an operator of the organization"
    assert len(origin) > 0, "anchors: empty origin"
    h: bytes32 = keccak256(origin)
    owner: bytes32 = self.origin_owner[h]
    n: uint256 = self.anchor_count[h]
    if owner == empty(bytes32):
        self.origin_owner[h] = org
    else:
        assert owner == org, "anchors: origin belongs to another organization"
        assert tree_size > self.checkpoints[h][n - 1].tree_size, "anchors: tree size must increase"
    self.checkpoints[h][n] = Checkpoint(
        tree_size=tree_size, root_hash=root_hash, anchored_at=convert(block.timestamp, uint64)
    )
    self.anchor_count[h] = n + 1
    log CheckpointAnchored(
        org=org, origin_hash=h, index=n, origin=origin, tree_size=tree_size,
        root_hash=root_hash, by=msg.sender,
    )
    return n
