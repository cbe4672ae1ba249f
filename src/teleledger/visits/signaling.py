"""The WebRTC signaling hub: relays offers, answers and ICE candidates between the two people
of one visit, and tells them what the server decided (admitted, ended, a new chat message).

Media never passes through here: the browsers connect peer to peer (or through TURN). The hub
only carries the few kilobytes it takes to set that connection up, keyed by Appointment id.

Rules the hub enforces on its own, whatever the caller checked before:

* a room holds the visit's participants only (``participants`` given at ``join``), at most two
  at a time and one per role; a third person is refused (``RoomRefused``). The *same* person
  connecting again (a reconnect after a network drop the server has not noticed yet, a second
  tab) takes over: the older connection is closed with 4409 ("replaced");
* every frame is validated: JSON text, at most ``max_frame_bytes``, ``type`` from the allowlist
  below, each field of the right type and bounded length. Anything else is answered with an
  ``error`` frame to the sender alone and the connection stays open;
* what is relayed is rebuilt from the validated fields only, with ``from`` stamped by the
  server from the authenticated connection: a client cannot speak for the other side or smuggle
  fields through;
* media negotiation (everything but ``ping``) is relayed only once the patient is admitted;
* each connection may send ``rate`` frames per second (bursts up to ``burst``).

Frames (client → hub; relayed to the other participant with ``"from": "<role>"`` added):

    offer          {"sdp": str, "fresh": bool?}   practitioner → patient; fresh = a new
                                                  RTCPeerConnection, drop yours
    answer         {"sdp": str}
    ice-candidate  {"candidate": {"candidate": str, "sdpMid": str|null,
                    "sdpMLineIndex": int|null, "usernameFragment": str|null} | null}
    ready          {}      the patient has a fresh RTCPeerConnection and waits for an offer
    media          {"camera": bool, "microphone": bool}
    typing, hangup {}
    ping           {}      answered with pong by the hub itself, never relayed
    (every frame may carry "id": a string of at most 64 characters, echoed and relayed)

Server → client: ``welcome`` {you, peers, admitted, encounter?}, ``peer-joined`` / ``peer-left`` {role},
``admitted`` {encounter}, ``ended`` {encounter, minutes}, ``chat`` {message}, ``pong``,
``error`` {code, message}. Codes: malformed, too-large, unknown-type, invalid-field,
not-admitted, no-peer, rate-limited.

One hub per process — a known limitation. With several app processes (on PostgreSQL behind a
load balancer) the two people of a visit, and the admit/end/chat requests of that visit, must
reach the same process: run one process per port and route by the visit id in the path (sticky
sessions). ``TELELEDGER_WORKERS`` > 1 on one port cannot guarantee that (the kernel picks the
worker per connection), so video visits need one worker per port. Relaying between processes
(PostgreSQL LISTEN/NOTIFY) is future work. What is stored (Appointment, Encounter, chat) and
every refusal stay correct either way: only the live notifications are per process.

Pure asyncio, no web framework: the web layer feeds frames in and drains each connection's
``outbox``. It never logs a frame's content (SDP holds addresses; chat is PHI).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

__all__ = ["Close", "Connection", "Hub", "RoomRefused"]

#: relayed types → whether they need the patient to have been admitted
RELAYED: Final[dict[str, bool]] = {
    "offer": True, "answer": True, "ice-candidate": True, "ready": True, "media": True, "typing": True,
    "hangup": True,
}
MAX_SDP_CHARS: Final = 60_000
MAX_CANDIDATE_CHARS: Final = 1_024
MAX_SHORT_CHARS: Final = 256
MAX_ID_CHARS: Final = 64
MAX_MLINE_INDEX: Final = 1_024

#: close codes the hub uses (4000–4999 are the application's)
CLOSE_REPLACED: Final = 4409
CLOSE_SLOW: Final = 4429
CLOSE_ENDED: Final = 1000


class RoomRefused(Exception):  # noqa: N818 - a refusal the web layer turns into close code 4403
    """This connection may not be in this room."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InvalidFrame(Exception):  # noqa: N818
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Close:
    """Put in an outbox: close the connection with this code and reason."""

    code: int
    reason: str


@dataclass(eq=False)
class Connection:
    """One participant's socket, as the hub sees it. The web layer sends ``outbox`` items
    (JSON text, or a final ``Close``) to the socket in order."""

    room_id: str
    member: str
    role: str
    outbox: asyncio.Queue[str | Close]
    tokens: float
    refilled: float
    open: bool = True

    async def next(self) -> str | Close:
        return await self.outbox.get()


@dataclass
class _Room:
    participants: frozenset[str]
    admitted: bool = False
    encounter: str | None = None
    members: dict[str, Connection] = field(default_factory=dict)  # member → its current connection


class Hub:
    def __init__(self, *, max_frame_bytes: int = 64 * 1024, rate: float = 50.0, burst: int = 200,
                 outbox_size: int = 512, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.rate = rate
        self.burst = burst
        self.outbox_size = outbox_size
        self.clock = clock
        self._rooms: dict[str, _Room] = {}

    # ---- membership -------------------------------------------------------------------------

    def join(self, room_id: str, *, member: str, role: str, participants: frozenset[str],
             admitted: bool = False, encounter: str | None = None) -> Connection:
        """Add ``member`` (a participant reference such as ``Patient/<id>``) to the room; raises
        ``RoomRefused`` for someone who is not a participant or would be the third person."""
        if member not in participants:
            raise RoomRefused("you are not a participant of this visit")
        room = self._rooms.get(room_id)
        if room is None:
            room = self._rooms[room_id] = _Room(participants)
        elif participants != room.participants:
            # the Appointment changed since the room opened: the newest participant list wins
            room.participants = participants
        for other, conn in room.members.items():
            if other != member and conn.role == role:
                raise RoomRefused(f"another {role} is already in this visit")
        if member not in room.members and len(room.members) >= 2:
            raise RoomRefused("this visit already has its two participants")
        room.admitted = room.admitted or admitted
        room.encounter = room.encounter or encounter
        old = room.members.get(member)
        conn = Connection(room_id, member, role, asyncio.Queue(self.outbox_size), float(self.burst), self.clock())
        room.members[member] = conn
        if old is not None:
            self._close(old, CLOSE_REPLACED, "replaced by a newer connection of the same participant")
        welcome = {"type": "welcome", "you": role, "admitted": room.admitted,
                   "peers": sorted(c.role for m, c in room.members.items() if m != member)}
        if room.encounter:
            welcome["encounter"] = room.encounter
        self._deliver(conn, welcome)
        self._to_others(room, conn, {"type": "peer-joined", "role": role})
        return conn

    def leave(self, conn: Connection) -> None:
        """The connection is gone; tell the other participant and drop an empty room."""
        conn.open = False
        room = self._rooms.get(conn.room_id)
        if room is None or room.members.get(conn.member) is not conn:
            return  # replaced already, or the room was ended
        del room.members[conn.member]
        self._to_others(room, conn, {"type": "peer-left", "role": conn.role})
        if not room.members:
            del self._rooms[conn.room_id]

    # ---- what the server decided ------------------------------------------------------------

    def admit(self, room_id: str, encounter_id: str) -> None:
        room = self._rooms.get(room_id)
        if room is not None:
            room.admitted = True
            room.encounter = encounter_id
            self._broadcast(room, {"type": "admitted", "encounter": encounter_id})

    def end(self, room_id: str, event: dict[str, Any]) -> None:
        """Tell both the visit has ended, close their connections and forget the room."""
        room = self._rooms.pop(room_id, None)
        if room is None:
            return
        self._broadcast(room, {**event, "type": "ended"})
        for conn in list(room.members.values()):
            self._close(conn, CLOSE_ENDED, "the visit has ended")

    def publish(self, room_id: str, event: dict[str, Any]) -> None:
        """A server event (a new chat message) to everyone in the room."""
        room = self._rooms.get(room_id)
        if room is not None:
            self._broadcast(room, event)

    # ---- frames from a client ---------------------------------------------------------------

    def receive(self, conn: Connection, raw: str | bytes) -> None:
        """Validate one frame from ``conn`` and relay it, answer it, or answer with an error."""
        if not conn.open:
            return
        if not self._take_token(conn):
            self._error(conn, "rate-limited", f"too many messages: at most {self.rate:g} per second")
            return
        try:
            msg = self._parse(raw)
        except InvalidFrame as exc:
            self._error(conn, exc.code, exc.message)
            return
        kind = msg["type"]
        room = self._rooms.get(conn.room_id)
        if room is None or room.members.get(conn.member) is not conn:
            return
        if kind == "ping":
            self._deliver(conn, {"type": "pong", **({"id": msg["id"]} if "id" in msg else {})})
            return
        if RELAYED[kind] and not room.admitted:
            self._error(conn, "not-admitted", "the practitioner has not admitted the patient yet", msg.get("id"))
            return
        peers = [c for m, c in room.members.items() if m != conn.member]
        if not peers:
            self._error(conn, "no-peer", "nobody else is in the room to receive this", msg.get("id"))
            return
        msg["from"] = conn.role  # stamped here: whatever the client wrote is not in ``msg``
        text = orjson.dumps(msg).decode()
        for peer in peers:
            self._deliver_text(peer, text)

    # ---- introspection (tests, benchmarks) --------------------------------------------------

    def room_count(self) -> int:
        return len(self._rooms)

    def occupants(self, room_id: str) -> list[str]:
        room = self._rooms.get(room_id)
        return sorted(c.role for c in room.members.values()) if room else []

    def is_admitted(self, room_id: str) -> bool:
        room = self._rooms.get(room_id)
        return bool(room and room.admitted)

    # ---- internals --------------------------------------------------------------------------

    def _take_token(self, conn: Connection) -> bool:
        now = self.clock()
        conn.tokens = min(float(self.burst), conn.tokens + (now - conn.refilled) * self.rate)
        conn.refilled = now
        if conn.tokens < 1:
            return False
        conn.tokens -= 1
        return True

    def _parse(self, raw: str | bytes) -> dict[str, Any]:
        if not isinstance(raw, str):
            raise InvalidFrame("malformed", "binary frames are not accepted: send JSON text")
        if len(raw) > self.max_frame_bytes or len(raw.encode()) > self.max_frame_bytes:
            raise InvalidFrame("too-large", f"the message is larger than {self.max_frame_bytes} bytes")
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise InvalidFrame("malformed", "the message is not valid JSON") from None
        if not isinstance(data, dict):
            raise InvalidFrame("malformed", "the message must be a JSON object with a \"type\"")
        kind = data.get("type")
        if not isinstance(kind, str) or (kind not in RELAYED and kind != "ping"):
            # never echoed: the sender's text has no business in a frame the page may display
            raise InvalidFrame("unknown-type", "missing or unknown message type; allowed are "
                                               f"{', '.join(sorted([*RELAYED, 'ping']))}")
        out: dict[str, Any] = {"type": kind}
        if "id" in data:
            out["id"] = _string(data, "id", MAX_ID_CHARS, allow_empty=False)
        if kind in ("offer", "answer"):
            out["sdp"] = _string(data, "sdp", MAX_SDP_CHARS, allow_empty=False)
            if kind == "offer" and "fresh" in data:
                out["fresh"] = _bool(data, "fresh")
        elif kind == "ice-candidate":
            out["candidate"] = _candidate(data.get("candidate", _MISSING))
        elif kind == "media":
            out["camera"] = _bool(data, "camera")
            out["microphone"] = _bool(data, "microphone")
        return out

    def _error(self, conn: Connection, code: str, message: str, msg_id: str | None = None) -> None:
        frame = {"type": "error", "code": code, "message": message}
        if msg_id is not None:
            frame["id"] = msg_id
        self._deliver(conn, frame)

    def _broadcast(self, room: _Room, event: dict[str, Any]) -> None:
        text = orjson.dumps(event).decode()
        for conn in list(room.members.values()):
            self._deliver_text(conn, text)

    def _to_others(self, room: _Room, conn: Connection, event: dict[str, Any]) -> None:
        text = orjson.dumps(event).decode()
        for other in list(room.members.values()):
            if other is not conn:
                self._deliver_text(other, text)

    def _deliver(self, conn: Connection, event: dict[str, Any]) -> None:
        self._deliver_text(conn, orjson.dumps(event).decode())

    def _deliver_text(self, conn: Connection, text: str) -> None:
        if not conn.open:
            return
        try:
            conn.outbox.put_nowait(text)
        except asyncio.QueueFull:
            # a receiver that stopped reading must not make the hub hold its messages forever
            self._close(conn, CLOSE_SLOW, "too many messages waiting: reconnect")
            self.leave(conn)

    def _close(self, conn: Connection, code: int, reason: str) -> None:
        if not conn.open:
            return
        conn.open = False
        try:
            conn.outbox.put_nowait(Close(code, reason))
        except asyncio.QueueFull:
            # a full outbox belongs to a reader that stopped reading: its backlog is dropped
            while not conn.outbox.empty():
                conn.outbox.get_nowait()
            conn.outbox.put_nowait(Close(code, reason))


_MISSING: Final = object()


def _string(data: dict[str, Any], name: str, limit: int, *, allow_empty: bool = True) -> str:
    value = data.get(name, _MISSING)
    if not isinstance(value, str):
        raise InvalidFrame("invalid-field", f"{name} must be a string")
    if len(value) > limit:
        raise InvalidFrame("invalid-field", f"{name} is longer than {limit} characters")
    if not value and not allow_empty:
        raise InvalidFrame("invalid-field", f"{name} must not be empty")
    return value


def _bool(data: dict[str, Any], name: str) -> bool:
    value = data.get(name, _MISSING)
    if not isinstance(value, bool):
        raise InvalidFrame("invalid-field", f"{name} must be true or false")
    return value


def _candidate(value: object) -> dict[str, Any] | None:
    if value is None:
        return None  # end of candidates
    if not isinstance(value, dict):
        raise InvalidFrame("invalid-field", "candidate must be an RTCIceCandidateInit object or null")
    out: dict[str, Any] = {"candidate": _string(value, "candidate", MAX_CANDIDATE_CHARS)}
    for name in ("sdpMid", "usernameFragment"):
        if value.get(name) is not None:
            out[name] = _string(value, name, MAX_SHORT_CHARS)
        elif name in value:
            out[name] = None
    index = value.get("sdpMLineIndex")
    if index is not None:
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index <= MAX_MLINE_INDEX:
            raise InvalidFrame("invalid-field", f"sdpMLineIndex must be an integer from 0 to {MAX_MLINE_INDEX}")
        out["sdpMLineIndex"] = index
    elif "sdpMLineIndex" in value:
        out["sdpMLineIndex"] = None
    if "sdpMid" not in out and "sdpMLineIndex" not in out and out["candidate"]:
        raise InvalidFrame("invalid-field", "a candidate needs sdpMid or sdpMLineIndex")
    return out
