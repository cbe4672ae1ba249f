"""E-prescriptions: signed by the prescriber, verifiable by any pharmacy, dispensed once on chain.

    token.py     the prescription token (content hash, EIP-712 signature, QR) — pure
    service.py   issuing, verifying against the chain, dispensing (MedicationDispense + PrescriptionRegistry)

Never puts PHI on the chain: the registry holds a salted hash of the content, a patient
pseudonym, addresses and quantities.
"""
