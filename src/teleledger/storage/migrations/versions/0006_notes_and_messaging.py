"""clinical notes and secure messaging (visits.notes, visits.messaging)

Revision ID: 0006
Revises: 0005

Tables of ``teleledger.visits.notes_tables``: ``note_drafts`` (unsigned notes, sealed with the
patient's data key) and ``message_reads`` (per-participant read state of secure messages).
"""

from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'note_drafts',
        sa.Column('id', sa.String(length=36), nullable=False),
        sa.Column('encounter_id', sa.String(length=64), nullable=False),
        sa.Column('author', sa.String(length=64), nullable=False),
        sa.Column('patient_id', sa.String(length=64), nullable=False),
        sa.Column('composition_id', sa.String(length=64), nullable=True),
        sa.Column('base_version', sa.Integer(), nullable=True),
        sa.Column('body', sa.LargeBinary(), nullable=False),
        sa.Column('created', sa.BigInteger(), nullable=False),
        sa.Column('updated', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('encounter_id', 'author', name='uq_note_drafts_encounter_author'),
    )
    with op.batch_alter_table('note_drafts', schema=None) as batch_op:
        batch_op.create_index('ix_note_drafts_patient', ['patient_id'], unique=False)

    op.create_table(
        'message_reads',
        sa.Column('reader', sa.String(length=160), nullable=False),
        sa.Column('communication_id', sa.String(length=64), nullable=False),
        sa.Column('thread_id', sa.String(length=64), nullable=False),
        sa.Column('patient_id', sa.String(length=64), nullable=False),
        sa.Column('sent', sa.BigInteger(), nullable=False),
        sa.Column('read_at', sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint('reader', 'communication_id'),
    )
    with op.batch_alter_table('message_reads', schema=None) as batch_op:
        batch_op.create_index('ix_message_reads_reader_thread', ['reader', 'thread_id'], unique=False)
        batch_op.create_index('ix_message_reads_thread', ['thread_id'], unique=False)
        batch_op.create_index('ix_message_reads_patient', ['patient_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('message_reads', schema=None) as batch_op:
        batch_op.drop_index('ix_message_reads_patient')
        batch_op.drop_index('ix_message_reads_thread')
        batch_op.drop_index('ix_message_reads_reader_thread')
    op.drop_table('message_reads')
    with op.batch_alter_table('note_drafts', schema=None) as batch_op:
        batch_op.drop_index('ix_note_drafts_patient')
    op.drop_table('note_drafts')
