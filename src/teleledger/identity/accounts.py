"""Accounts (people) and clients (services): creation and authentication against the database.

Passwords and client secrets are stored only as argon2id hashes. Authentication failures are
one indistinguishable ``Unauthenticated`` ("invalid credentials"), whether the user exists or not.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError

from teleledger.core.errors import Conflict, InvalidInput, Unauthenticated
from teleledger.identity.passwords import Hasher, check_password_policy
from teleledger.identity.scopes import ROLE_SCOPES, ScopeSet, fhir_user
from teleledger.storage import tables as t
from teleledger.storage.db import UnitOfWork

if TYPE_CHECKING:
    from teleledger.identity.keystore import Keystore

ROLES = ("patient", "practitioner", "pharmacist", "payer", "researcher", "admin")
_USERNAME = re.compile(r"^[A-Za-z0-9._@-]{3,128}$")
_REF = re.compile(r"^(Patient|Practitioner|Organization|RelatedPerson)/([A-Za-z0-9\-.]{1,64})$")
#: roles whose accounts may act for an Organization (a consent naming it reaches them)
ORGANIZATION_ROLES = ("practitioner", "pharmacist", "payer", "researcher", "admin")


@dataclass(frozen=True)
class Account:
    id: str
    username: str
    role: str
    patient_id: str | None
    practitioner_id: str | None
    organization_id: str | None = None
    related_person_id: str | None = None

    @property
    def fhir_user(self) -> str | None:
        """The SMART ``fhirUser`` of this person: their Patient, Practitioner or RelatedPerson."""
        return fhir_user(self.patient_id, self.practitioner_id, self.related_person_id)

    def token_links(self) -> dict[str, str | None]:
        """The token claims that link the account to FHIR resources (``TokenIssuer.issue`` kwargs)."""
        return {"patient": self.patient_id, "fhir_user": self.fhir_user, "organization": self.organization_id,
                "related_person": self.related_person_id}


def _account(row: Any) -> Account:
    return Account(row.id, row.username, row.role, row.patient_id, row.practitioner_id, row.organization_id,
                   row.related_person_id)


@dataclass(frozen=True)
class Client:
    client_id: str
    scopes: ScopeSet


def parse_link(ref: str | None, expected: str) -> str | None:
    if ref is None:
        return None
    m = _REF.fullmatch(ref)
    if not m or m.group(1) != expected:
        raise InvalidInput(f"expected a reference like {expected}/ID, found {ref!r}")
    return m.group(2)


class Accounts:
    def __init__(self, engine: Engine, hasher: Hasher, *, keystore: Keystore | None = None) -> None:
        self.engine = engine
        self.hasher = hasher
        # every account gets its secp256k1 key (key id ``user:<username>``) in the same commit
        self.keystore = keystore
        # a real hash to compare against when the user does not exist, so both paths cost the same
        self._dummy = hasher.hash("not-a-real-password-0")

    def create_user(self, *, username: str, password: str, role: str, patient: str | None = None,
                    practitioner: str | None = None, organization: str | None = None,
                    related_person: str | None = None) -> Account:
        """A new account. A patient account is linked to their Patient, or to the RelatedPerson
        they act as for someone else (a parent, guardian or caregiver: a delegate), or both; a
        practitioner to their Practitioner; any other role may name its Organization."""
        if role not in ROLES:
            raise InvalidInput(f"unknown role {role!r}; one of {', '.join(ROLES)}")
        if not _USERNAME.fullmatch(username):
            raise InvalidInput("username must be 3–128 characters of letters, digits and . _ @ -")
        check_password_policy(password)
        patient_id = parse_link(patient, "Patient")
        practitioner_id = parse_link(practitioner, "Practitioner")
        organization_id = parse_link(organization, "Organization")
        related_person_id = parse_link(related_person, "RelatedPerson")
        if role == "patient" and not (patient_id or related_person_id):
            raise InvalidInput("a patient account needs --patient Patient/ID (or --related-person RelatedPerson/ID "
                               "for a delegate)")
        if role != "patient" and related_person_id:
            raise InvalidInput("only patient accounts act as a RelatedPerson (a delegate)")
        if role not in ORGANIZATION_ROLES and organization_id:
            raise InvalidInput(f"a {role} account is not linked to an Organization")
        if role == "practitioner" and not practitioner_id:
            raise InvalidInput("a practitioner account needs --practitioner Practitioner/ID")
        if role != "patient" and patient_id:
            raise InvalidInput("only patient accounts are linked to a Patient")
        account = Account(str(uuid.uuid4()), username, role, patient_id, practitioner_id, organization_id,
                          related_person_id)
        with UnitOfWork(self.engine) as uow:
            try:
                uow.c.execute(t.users.insert().values(
                    id=account.id, username=username, password_hash=self.hasher.hash(password), role=role,
                    patient_id=patient_id, practitioner_id=practitioner_id, organization_id=organization_id,
                    related_person_id=related_person_id, active=True, created=int(time.time()),
                ))
                if self.keystore is not None:
                    self.keystore.ensure_in(uow.c, f"user:{username}")
                uow.commit()
            except IntegrityError:
                raise Conflict(f"username {username!r} is taken") from None
        return account

    def get_by_username(self, username: str) -> Account | None:
        with UnitOfWork(self.engine) as uow:
            row = uow.c.execute(select(t.users).where(t.users.c.username == username)).first()
        return None if row is None else _account(row)

    def authenticate(self, username: str, password: str) -> Account:
        if not _USERNAME.fullmatch(username):
            self.hasher.verify(self._dummy, password)
            raise Unauthenticated("invalid credentials")
        with UnitOfWork(self.engine) as uow:
            row = uow.c.execute(select(t.users).where(t.users.c.username == username)).first()
        if row is None or not row.active:
            self.hasher.verify(self._dummy, password)
            raise Unauthenticated("invalid credentials")
        if not self.hasher.verify(row.password_hash, password):
            raise Unauthenticated("invalid credentials")
        return _account(row)

    def role_scopes(self, role: str) -> ScopeSet:
        return ScopeSet.parse(ROLE_SCOPES[role])

    def create_client(self, *, client_id: str, secret: str, scopes: str) -> Client:
        if not _USERNAME.fullmatch(client_id):
            raise InvalidInput("client id must be 3–128 characters of letters, digits and . _ @ -")
        if len(secret) < 16:
            raise InvalidInput("a client secret must have at least 16 characters")
        parsed = ScopeSet.parse(scopes)
        with UnitOfWork(self.engine) as uow:
            try:
                uow.c.execute(t.clients.insert().values(
                    client_id=client_id, secret_hash=self.hasher.hash(secret), scopes=str(parsed), active=True,
                    created=int(time.time()),
                ))
                uow.commit()
            except IntegrityError:
                raise Conflict(f"client {client_id!r} exists") from None
        return Client(client_id, parsed)

    def authenticate_client(self, client_id: str, secret: str) -> Client:
        if not _USERNAME.fullmatch(client_id):
            self.hasher.verify(self._dummy, secret)
            raise Unauthenticated("invalid client credentials")
        with UnitOfWork(self.engine) as uow:
            row = uow.c.execute(select(t.clients).where(t.clients.c.client_id == client_id)).first()
        if row is None or not row.active:
            self.hasher.verify(self._dummy, secret)
            raise Unauthenticated("invalid client credentials")
        if not self.hasher.verify(row.secret_hash, secret):
            raise Unauthenticated("invalid client credentials")
        return Client(row.client_id, ScopeSet.parse(row.scopes))

    def count_users(self) -> int:
        with UnitOfWork(self.engine) as uow:
            return len(uow.c.execute(select(t.users.c.id)).all())
