# pragma version ~=0.4.3
# pragma evm-version cancun
# pragma optimize gas
"""
@title ParticipantRegistry
@notice Who may act for which organization on the teleledger consortium chain.
        Organizations are admitted by a quorum of consortium admins; each organization's
        admins then manage their own members' roles. Other contracts (ConsentRegistry,
        AnchorRegistry, ...) ask `has_role` before letting an address act for an organization.
@dev    Governance changes (admin set, quorum, new organization) are proposals identified by
        keccak256(abi_encode(KIND, args..., epoch)). Each consortium admin approves once; the
        approval that reaches the quorum executes it. Changing the admin set or the quorum bumps
        `epoch`, which voids every pending proposal, so approvals by a removed admin can never
        count and a lowered quorum never executes a half-approved proposal by surprise.
        No PHI: organizations are opaque bytes32 ids, members are addresses.
"""

ROLE_PRACTITIONER: public(constant(uint256)) = 1
ROLE_PHARMACIST: public(constant(uint256)) = 2
ROLE_PAYER: public(constant(uint256)) = 4
ROLE_RESEARCHER: public(constant(uint256)) = 8
ROLE_ORG_ADMIN: public(constant(uint256)) = 16
# the node's authority key: relays patient signatures, binds patients, anchors checkpoints
ROLE_OPERATOR: public(constant(uint256)) = 32
ALL_ROLES: public(constant(uint256)) = 63

MAX_ADMINS: constant(uint256) = 32

KIND_ADD_ORG: constant(uint256) = 1
KIND_ADD_ADMIN: constant(uint256) = 2
KIND_REMOVE_ADMIN: constant(uint256) = 3
KIND_SET_QUORUM: constant(uint256) = 4

event ConsortiumAdminAdded:
    admin: indexed(address)

event ConsortiumAdminRemoved:
    admin: indexed(address)

event QuorumChanged:
    quorum: uint256

event ProposalApproved:
    proposal: indexed(bytes32)
    admin: indexed(address)
    approvals: uint256

event OrganizationAdded:
    org: indexed(bytes32)
    org_admin: indexed(address)

event MemberRolesSet:
    org: indexed(bytes32)
    account: indexed(address)
    roles: uint256
    by: indexed(address)

is_admin: public(HashMap[address, bool])
admin_count: public(uint256)
quorum: public(uint256)
epoch: public(uint256)

approvals: public(HashMap[bytes32, uint256])
approved_by: public(HashMap[bytes32, HashMap[address, bool]])

is_organization: public(HashMap[bytes32, bool])
roles_of: public(HashMap[bytes32, HashMap[address, uint256]])
org_admin_count: public(HashMap[bytes32, uint256])


@deploy
def __init__(admins: DynArray[address, MAX_ADMINS], quorum: uint256):
    assert len(admins) > 0, "participants: no admins"
    for admin: address in admins:
        assert admin != empty(address), "participants: zero address"
        assert not self.is_admin[admin], "participants: duplicate admin"
        self.is_admin[admin] = True
        log ConsortiumAdminAdded(admin=admin)
    self.admin_count = len(admins)
    assert quorum > 0 and quorum <= len(admins), "participants: bad quorum"
    self.quorum = quorum
    log QuorumChanged(quorum=quorum)


# ---- views ------------------------------------------------------------------------------------

@external
@view
def has_role(org: bytes32, account: address, role: uint256) -> bool:
    """@notice True when `account` holds every bit of `role` in the active organization `org`."""
    return self.is_organization[org] and role != 0 and (self.roles_of[org][account] & role) == role


@external
@view
def is_member(org: bytes32, account: address) -> bool:
    return self.is_organization[org] and self.roles_of[org][account] != 0


@external
@view
def proposal_id(kind: uint256, subject: bytes32, account: address, amount: uint256) -> bytes32:
    """@notice The id the next approval of this change counts towards (depends on `epoch`)."""
    return self._proposal_id(kind, subject, account, amount)


# ---- consortium governance --------------------------------------------------------------------

@external
def approve_organization(org: bytes32, org_admin: address) -> bool:
    """@notice Approve admitting `org` with `org_admin` as its first admin; True once executed."""
    assert org != empty(bytes32), "participants: empty organization id"
    assert org_admin != empty(address), "participants: zero address"
    assert not self.is_organization[org], "participants: organization exists"
    if not self._approve(self._proposal_id(KIND_ADD_ORG, org, org_admin, 0)):
        return False
    self.is_organization[org] = True
    log OrganizationAdded(org=org, org_admin=org_admin)
    self._set_roles(org, org_admin, ROLE_ORG_ADMIN)
    return True


@external
def approve_add_admin(account: address) -> bool:
    assert account != empty(address), "participants: zero address"
    assert not self.is_admin[account], "participants: already an admin"
    assert self.admin_count < MAX_ADMINS, "participants: too many admins"
    if not self._approve(self._proposal_id(KIND_ADD_ADMIN, empty(bytes32), account, 0)):
        return False
    self.is_admin[account] = True
    self.admin_count += 1
    self.epoch += 1
    log ConsortiumAdminAdded(admin=account)
    return True


@external
def approve_remove_admin(account: address) -> bool:
    assert self.is_admin[account], "participants: not an admin"
    assert self.admin_count - 1 >= self.quorum, "participants: would break quorum"
    if not self._approve(self._proposal_id(KIND_REMOVE_ADMIN, empty(bytes32), account, 0)):
        return False
    self.is_admin[account] = False
    self.admin_count -= 1
    self.epoch += 1
    log ConsortiumAdminRemoved(admin=account)
    return True


@external
def approve_quorum(new_quorum: uint256) -> bool:
    assert new_quorum > 0 and new_quorum <= self.admin_count, "participants: bad quorum"
    if not self._approve(self._proposal_id(KIND_SET_QUORUM, empty(bytes32), empty(address), new_quorum)):
        return False
    self.quorum = new_quorum
    self.epoch += 1
    log QuorumChanged(quorum=new_quorum)
    return True


# ---- organization membership ------------------------------------------------------------------

@external
def set_member_roles(org: bytes32, account: address, roles: uint256):
    """@notice An organization admin sets `account`'s roles in `org` (0 removes the member)."""
    assert self.is_organization[org], "participants: unknown organization"
    assert self.roles_of[org][msg.sender] & ROLE_ORG_ADMIN != 0, "participants: not an organization admin"
    assert account != empty(address), "participants: zero address"
    assert roles & ~ALL_ROLES == 0, "participants: unknown role"
    self._set_roles(org, account, roles)


# ---- internals --------------------------------------------------------------------------------

@internal
@view
def _proposal_id(kind: uint256, subject: bytes32, account: address, amount: uint256) -> bytes32:
    return keccak256(abi_encode(kind, subject, account, amount, self.epoch))


@internal
def _approve(proposal: bytes32) -> bool:
    assert self.is_admin[msg.sender], "participants: not a consortium admin"
    assert not self.approved_by[proposal][msg.sender], "participants: already approved"
    self.approved_by[proposal][msg.sender] = True
    count: uint256 = self.approvals[proposal] + 1
    self.approvals[proposal] = count
    log ProposalApproved(proposal=proposal, admin=msg.sender, approvals=count)
    return count >= self.quorum


@internal
def _set_roles(org: bytes32, account: address, roles: uint256):
    was_admin: bool = self.roles_of[org][account] & ROLE_ORG_ADMIN != 0
    is_admin: bool = roles & ROLE_ORG_ADMIN != 0
    if was_admin and not is_admin:
        assert self.org_admin_count[org] > 1, "participants: last organization admin"
        self.org_admin_count[org] -= 1
    elif is_admin and not was_admin:
        self.org_admin_count[org] += 1
    self.roles_of[org][account] = roles
    log MemberRolesSet(org=org, account=account, roles=roles, by=msg.sender)
