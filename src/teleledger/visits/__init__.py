"""Visits: everything between "I need to see a doctor" and the note after the video call.

Modules, in three groups (each kept by one engineer):

* scheduling — ``availability`` (pure: a practitioner's weekly hours, breaks, visit length and
  time zone → concrete slots, correct across daylight-saving changes), ``scheduling`` (the use
  cases: publish availability as FHIR Schedule and Slots, find practitioners, book, cancel and
  reschedule Appointments with a database-level guarantee against double booking, the
  Appointment state machine) and ``tables`` (``slot_bookings``, the table behind that
  guarantee);
* rooms and signaling — ``rooms`` (the visit room: who may enter and when, admission, in-visit
  chat and files, the end of the visit) and ``signaling`` (the WebRTC signaling hub);
* notes and messaging — ``notes`` (clinical notes, drafts, signing), ``messaging`` (secure
  messages between a patient and their care team), ``notes_tables``; and ``attachments``, the
  one check every attached file passes (used by the room's chat and by messaging).

Every clinical fact here is a FHIR R4 resource stored through ``teleledger.records`` (so it is
encrypted, versioned, logged and authorized like any other), and every access decision is made
by ``teleledger.policy``. This package must never import ``teleledger.web`` nor speak HTTP.
"""
