"""Alembic environment: runs on the connection handed over by ``teleledger.storage.db.migrate``."""

from alembic import context
from sqlalchemy import create_engine

from teleledger.ledger.log import storage as _log_tables  # noqa: F401  (registers the log's tables)
from teleledger.visits import tables as _visit_tables  # noqa: F401  (registers the scheduling tables)
from teleledger.ledger.chain import storage as _chain_tables  # noqa: F401  (registers the chain's tables)
from teleledger.identity import keystore as _keystore_table  # noqa: F401  (registers the keystore table)
from teleledger.visits import notes_tables as _notes_tables  # noqa: F401  (registers note drafts, message reads)
from teleledger.prescriptions import tables as _rx_tables  # noqa: F401  (registers the e-prescription tables)
from teleledger.policy import consent_tables as _consent_tables  # noqa: F401  (registers the consent tables)
from teleledger.policy import delegate_tables as _delegate_tables  # noqa: F401  (registers the delegation table)
from teleledger.records import care_tables as _care_tables  # noqa: F401  (registers care_relationships)
from teleledger.storage.tables import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    # `alembic revision --autogenerate` run by a developer against a scratch database
    url = context.config.get_main_option("sqlalchemy.url") or "sqlite://"
    connection = create_engine(url).connect()

context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
