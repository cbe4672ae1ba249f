"""teleledger: telemedicine on HL7 FHIR R4 with a verifiable ledger as its trust layer."""

__version__ = "0.1.0"
