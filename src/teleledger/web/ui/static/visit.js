// The video visit room (templates/visit_room.html). Plain JavaScript, no build step.
//
// Roles: the practitioner always makes the offers and the patient answers, so the two never
// offer at once ("glare"). The patient says "ready" when it has a fresh RTCPeerConnection; the
// practitioner answers a "ready" with a fresh offer ({fresh: true}: drop your old connection).
// Each practitioner connection has a session id, carried as "id" by its offers and candidates
// and echoed by the patient's answers and candidates, so that nothing meant for a connection
// that was replaced meanwhile is applied to the new one.
// After a network drop the WebSocket reconnects with backoff, and the practitioner restarts ICE
// on the existing connection (createOffer({iceRestart: true})) if it is not connected.
//
// Everything shown from the network is set with textContent, never as HTML.
// For tests: window.teleledgerVisit = {pc, ws, state()}.
(() => {
  "use strict";
  const root = document.getElementById("visit-room");
  if (!root) return;
  const $ = (id) => document.getElementById(id);
  const cfg = {
    id: root.dataset.appointment,
    role: root.dataset.role,
    ice: JSON.parse(root.dataset.iceServers || "[]"),
    maxFile: Number(root.dataset.maxFileBytes),
    maxChat: Number(root.dataset.maxChatChars),
    allowedTypes: (root.dataset.allowedTypes || "").split(" ").filter(Boolean),
    counterpart: root.dataset.counterpart,
  };
  const practitioner = cfg.role === "practitioner";
  const api = `/api/visits/${encodeURIComponent(cfg.id)}`;

  let room = root.dataset.state; // waiting | in-progress | ended
  let encounter = root.dataset.encounter || null;
  let ws = null;
  let wsAttempts = 0;
  let wsTimer = null;
  let stopped = false; // no more reconnecting: the visit ended or we were refused
  let peerPresent = false;
  let pc = null;
  let localStream = null;
  let mediaPromise = null;
  let pending = []; // ICE candidates that arrived before the remote description
  let session = null; // the practitioner connection's id (both sides agree on it)
  let signalChain = Promise.resolve(); // signaling messages are handled one after the other
  let restartTimer = null;
  let lastTyping = 0;
  let typingTimer = null;
  let prevStats = { lost: 0, received: 0 };
  const shown = new Set();

  window.teleledgerVisit = {
    get pc() { return pc; },
    get ws() { return ws; },
    state() {
      return {
        room, role: cfg.role, encounter, peerPresent,
        signaling: ws ? ws.readyState : -1,
        connection: pc ? pc.connectionState : "none",
        ice: pc ? pc.iceConnectionState : "none",
        quality: $("quality") ? $("quality").dataset.quality : "unknown",
      };
    },
  };

  // ---- messages to the person ---------------------------------------------------------------

  function say(text) { $("room-status").textContent = text; }
  function showError(text) { const e = $("room-error"); e.textContent = text; e.hidden = !text; }
  function chatError(text) { const e = $("chat-error"); e.textContent = text; e.hidden = !text; }

  async function problem(response) {
    // an OperationOutcome's diagnostics, or the status line
    try {
      const body = await response.json();
      const issue = body && body.issue && body.issue[0];
      if (issue && issue.diagnostics) return issue.diagnostics;
    } catch (_) { /* not JSON */ }
    return `The server answered ${response.status} ${response.statusText}.`;
  }

  function localTimes() {
    document.querySelectorAll("time[datetime]").forEach((t) => {
      const d = new Date(t.getAttribute("datetime"));
      if (Number.isNaN(d.getTime())) return;
      t.title = t.textContent;
      t.textContent = d.toLocaleString([], { dateStyle: "medium", timeStyle: "short" });
    });
  }

  // ---- signaling socket ---------------------------------------------------------------------

  function connect() {
    if (stopped) return;
    clearTimeout(wsTimer);
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const sock = new WebSocket(`${scheme}://${location.host}/visits/${encodeURIComponent(cfg.id)}/ws`);
    ws = sock;
    sock.onopen = () => { wsAttempts = 0; };
    sock.onmessage = (ev) => {
      let msg;
      try { msg = JSON.parse(ev.data); } catch (_) { return; }
      handle(msg);
    };
    sock.onclose = (ev) => {
      if (ws !== sock) return;
      ws = null;
      if (stopped || room === "ended") return;
      if (ev.code === 4409) {
        stopped = true;
        showError("This visit is open in another tab or window, which has taken over. Close this one.");
        say("Not connected.");
        return;
      }
      if (ev.code >= 4400 && ev.code < 4500 && ev.code !== 4429) {
        stopped = true;
        showError(ev.reason || "You cannot join this visit.");
        say("Not connected.");
        return;
      }
      // a network drop, a restarted server: try again, waiting longer each time (at most 10 s)
      const delay = Math.min(10000, 500 * 2 ** wsAttempts) * (0.75 + Math.random() * 0.5);
      wsAttempts += 1;
      say(`The connection to the server was lost. Reconnecting in ${Math.max(1, Math.round(delay / 1000))} s…`);
      wsTimer = setTimeout(connect, delay);
    };
  }

  function send(msg) {
    if (ws && ws.readyState === WebSocket.OPEN) {
      ws.send(JSON.stringify(msg));
      return true;
    }
    return false;
  }

  window.addEventListener("online", () => { if (!ws && !stopped) connect(); });

  function handle(msg) {
    switch (msg.type) {
      case "welcome": onWelcome(msg); break;
      case "peer-joined": peerPresent = true; onPeerJoined(); break;
      case "peer-left": peerPresent = false; onPeerLeft(); break;
      case "admitted": onAdmitted(msg.encounter); break;
      case "ended": onEnded(msg.minutes); break;
      case "chat": showMessage(msg.message); break;
      case "typing": showTyping(); break;
      case "media": showRemoteMedia(msg); break;
      case "offer": case "answer": case "ice-candidate": case "ready": case "hangup":
        signalChain = signalChain.then(() => onSignal(msg)).catch((err) => {
          showError(`The call could not be set up: ${err && err.message ? err.message : err}`);
        });
        break;
      case "error":
        // "no-peer" and "not-admitted" are expected while the other person is away
        if (msg.code !== "no-peer" && msg.code !== "not-admitted") showError(`The server refused a message: ${msg.message}`);
        break;
      default: break;
    }
  }

  function onWelcome(msg) {
    peerPresent = (msg.peers || []).length > 0;
    if (msg.encounter) encounter = msg.encounter;
    say(room === "in-progress" || msg.admitted ? "Connected to the visit." : "Connected. Waiting for the visit to start.");
    showError("");
    updateWaiting();
    loadMessages();
    if (msg.admitted && room !== "in-progress") { onAdmitted(encounter); return; }
    if (room === "in-progress") resumeCall();
  }

  function onPeerJoined() {
    updateWaiting();
    if (room !== "in-progress") return;
    say(`${cfg.counterpart} is in the visit.`);
    if (practitioner) resumeCall();
  }

  function onPeerLeft() {
    updateWaiting();
    if (room === "in-progress") say(`${cfg.counterpart} left the visit or lost their connection; they can rejoin.`);
  }

  function updateWaiting() {
    if (!practitioner || room !== "waiting") return;
    const text = $("waiting-text");
    const admit = $("admit");
    if (!text || !admit) return;
    text.textContent = peerPresent ? `${cfg.counterpart} is waiting.` : `Nobody is waiting yet. This updates by itself when ${cfg.counterpart} arrives.`;
    admit.disabled = !peerPresent;
  }

  // ---- the visit's life ---------------------------------------------------------------------

  function onAdmitted(encounterId) {
    if (room === "in-progress" || room === "ended") return;
    room = "in-progress";
    if (encounterId) encounter = encounterId;
    const waiting = $("waiting-room");
    if (waiting) waiting.hidden = true;
    $("call").hidden = false;
    $("chat-form").hidden = false;
    $("file-form").hidden = false;
    $("chat-closed").hidden = true;
    showEncounterLinks();
    say(practitioner ? "The visit has started." : "You have been admitted. The visit is starting.");
    startQualityMonitor();
    // the patient's page answers admission with "ready", and the practitioner's with an offer
    if (!practitioner) resumeCall();
    else ensureMedia();
  }

  // the practitioner's links that need the visit's Encounter (visit note, prescription):
  // each says where it goes with data-encounter-href="...{encounter}..."
  function showEncounterLinks() {
    if (!encounter) return;
    document.querySelectorAll("a[data-encounter-href]").forEach((a) => {
      a.href = a.dataset.encounterHref.replace("{encounter}", encodeURIComponent(encounter));
      a.hidden = false;
    });
    document.querySelectorAll("[data-encounter-hint]").forEach((el) => { el.hidden = true; });
  }

  function usable(conn) {
    return conn && conn.remoteDescription && conn.connectionState !== "failed" && conn.connectionState !== "closed";
  }

  // (re)establish the call after admission, a reload or a reconnection of either side
  async function resumeCall() {
    await ensureMedia();
    if (room !== "in-progress") return;
    if (practitioner) {
      if (!peerPresent) return;
      if (!usable(pc)) signalChain = signalChain.then(() => offerFresh());
      else if (pc.connectionState !== "connected") restartIce();
    } else if (!usable(pc)) {
      newPeerConnection();
      send({ type: "ready" });
    }
  }

  function onEnded(minutes) {
    room = "ended";
    stopped = true;
    clearTimeout(wsTimer);
    if (pc) { pc.close(); pc = null; }
    if (localStream) localStream.getTracks().forEach((t) => t.stop());
    localStream = null;
    $("call").hidden = true;
    $("chat-form").hidden = true;
    $("file-form").hidden = true;
    const waiting = $("waiting-room");
    if (waiting) waiting.hidden = true;
    $("ended").hidden = false;
    if (typeof minutes === "number") $("ended-text").textContent = `It lasted ${minutes} minutes.`;
    showEncounterLinks();
    say("The visit has ended.");
    if (ws) ws.close(1000, "the visit has ended");
  }

  if (practitioner) {
    const admit = $("admit");
    if (admit) {
      admit.addEventListener("click", async () => {
        admit.disabled = true;
        showError("");
        const r = await fetch(`${api}/admit`, { method: "POST", credentials: "same-origin" });
        if (!r.ok) {
          showError(`The patient could not be admitted: ${await problem(r)}`);
          admit.disabled = !peerPresent;
          return;
        }
        onAdmitted((await r.json()).id);
      });
    }
    const endButton = $("end-visit");
    const confirm = $("end-confirm");
    endButton.addEventListener("click", () => {
      confirm.hidden = false;
      endButton.hidden = true;
      $("end-no").focus();
    });
    $("end-no").addEventListener("click", () => {
      confirm.hidden = true;
      endButton.hidden = false;
      endButton.focus();
    });
    $("end-yes").addEventListener("click", async () => {
      $("end-yes").disabled = true;
      const r = await fetch(`${api}/end`, { method: "POST", credentials: "same-origin" });
      $("end-yes").disabled = false;
      if (!r.ok) { showError(`The visit could not be ended: ${await problem(r)}`); return; }
      const enc = await r.json();
      onEnded(enc.length ? enc.length.value : undefined);
      $("ended-heading").focus();
    });
  }

  // ---- media and the peer connection --------------------------------------------------------

  function ensureMedia() {
    if (!mediaPromise) {
      mediaPromise = (async () => {
        try {
          localStream = await navigator.mediaDevices.getUserMedia({ video: true, audio: true });
          $("local-video").srcObject = localStream;
        } catch (err) {
          localStream = null;
          showError(`Your camera or microphone could not be started (${err && err.name ? err.name : err}). ` +
                    "You can still see and hear the other person if they can send, and use the chat.");
        }
      })();
    }
    return mediaPromise;
  }

  function newPeerConnection() {
    if (pc) {
      pc.onicecandidate = null; pc.ontrack = null; pc.onconnectionstatechange = null;
      pc.close();
    }
    pending = [];
    const conn = new RTCPeerConnection({ iceServers: cfg.ice });
    pc = conn;
    if (localStream) {
      localStream.getTracks().forEach((t) => conn.addTrack(t, localStream));
    } else {
      conn.addTransceiver("audio", { direction: "recvonly" });
      conn.addTransceiver("video", { direction: "recvonly" });
    }
    conn.ontrack = (ev) => {
      const video = $("remote-video");
      const stream = ev.streams && ev.streams[0] ? ev.streams[0] : new MediaStream([ev.track]);
      if (video.srcObject !== stream) video.srcObject = stream;
    };
    conn.onicecandidate = (ev) => {
      if (pc === conn && session) {
        send({ type: "ice-candidate", id: session, candidate: ev.candidate ? ev.candidate.toJSON() : null });
      }
    };
    conn.onconnectionstatechange = () => onConnectionState(conn);
    return conn;
  }

  async function offerFresh() {
    if (!practitioner || room !== "in-progress") return;
    await ensureMedia();
    const conn = newPeerConnection();
    session = `s${Date.now().toString(36)}${Math.random().toString(36).slice(2, 10)}`;
    const offer = await conn.createOffer();
    if (pc !== conn) return;
    await conn.setLocalDescription(offer);
    send({ type: "offer", id: session, sdp: conn.localDescription.sdp, fresh: true });
  }

  async function restartIce() {
    if (!practitioner || !pc || !peerPresent || pc.signalingState !== "stable") return;
    const conn = pc;
    say("Reconnecting the call…");
    const offer = await conn.createOffer({ iceRestart: true });
    if (pc !== conn || conn.signalingState !== "stable") return;
    await conn.setLocalDescription(offer);
    send({ type: "offer", id: session, sdp: conn.localDescription.sdp });
  }

  function onConnectionState(conn) {
    if (pc !== conn) return;
    const state = conn.connectionState;
    clearTimeout(restartTimer);
    if (state === "connected") {
      say("Connected to the visit.");
      showError("");
    } else if (state === "disconnected") {
      say("The call's connection is interrupted. Trying to recover…");
      // a short interruption often heals by itself; if not, restart ICE (practitioner) or
      // ask for a fresh connection (patient)
      restartTimer = setTimeout(() => repair(conn), 3000);
    } else if (state === "failed") {
      repair(conn);
    }
  }

  function repair(conn) {
    if (pc !== conn || room !== "in-progress" || conn.connectionState === "connected") return;
    if (practitioner) {
      restartIce();
    } else if (conn.connectionState === "failed") {
      newPeerConnection();
      send({ type: "ready" });
    }
  }

  async function onSignal(msg) {
    if (room !== "in-progress") return;
    if (msg.type === "ready" && practitioner) {
      await offerFresh();
    } else if (msg.type === "offer" && !practitioner) {
      await ensureMedia();
      const restart = !msg.fresh && msg.id === session && pc && pc.remoteDescription && pc.signalingState !== "closed";
      // a fresh offer, or a restart for a connection this page no longer has: answer on a new
      // connection (a brand-new one that has not been used yet will do)
      if (!restart && !(pc && !pc.remoteDescription && pc.signalingState === "stable")) newPeerConnection();
      session = msg.id || null;
      const conn = pc;
      await conn.setRemoteDescription({ type: "offer", sdp: msg.sdp });
      await flushCandidates(conn);
      const answer = await conn.createAnswer();
      await conn.setLocalDescription(answer);
      if (pc === conn) send({ type: "answer", id: session, sdp: conn.localDescription.sdp });
    } else if (msg.type === "answer" && practitioner) {
      if (!pc || pc.signalingState !== "have-local-offer" || msg.id !== session) return;
      const conn = pc;
      await conn.setRemoteDescription({ type: "answer", sdp: msg.sdp });
      await flushCandidates(conn);
    } else if (msg.type === "ice-candidate") {
      if (!msg.candidate || msg.id !== session) return; // another connection's, or end of candidates
      if (!pc || !pc.remoteDescription) { pending.push(msg.candidate); return; }
      await pc.addIceCandidate(msg.candidate).catch(() => {});
    }
  }

  async function flushCandidates(conn) {
    const list = pending;
    pending = [];
    for (const c of list) await conn.addIceCandidate(c).catch(() => {});
  }

  // ---- camera and microphone toggles --------------------------------------------------------

  function toggle(button, kind) {
    const off = button.getAttribute("aria-pressed") !== "true";
    button.setAttribute("aria-pressed", String(off));
    if (localStream) {
      const tracks = kind === "video" ? localStream.getVideoTracks() : localStream.getAudioTracks();
      tracks.forEach((t) => { t.enabled = !off; });
    }
    send({
      type: "media",
      camera: $("toggle-camera").getAttribute("aria-pressed") !== "true",
      microphone: $("toggle-microphone").getAttribute("aria-pressed") !== "true",
    });
    say(kind === "video" ? (off ? "Your camera is off." : "Your camera is on.")
                         : (off ? "Your microphone is muted." : "Your microphone is on."));
  }
  $("toggle-camera").addEventListener("click", (ev) => toggle(ev.currentTarget, "video"));
  $("toggle-microphone").addEventListener("click", (ev) => toggle(ev.currentTarget, "audio"));

  function showRemoteMedia(msg) {
    const parts = [];
    if (msg.camera === false) parts.push("camera off");
    if (msg.microphone === false) parts.push("muted");
    $("remote-media").textContent = parts.length ? `(${parts.join(", ")})` : "";
  }

  // ---- connection quality -------------------------------------------------------------------

  let qualityTimer = null;
  function startQualityMonitor() {
    if (!qualityTimer) qualityTimer = setInterval(sampleQuality, 2000);
  }

  async function sampleQuality() {
    const el = $("quality");
    const text = $("quality-text");
    if (!pc || pc.connectionState !== "connected") {
      el.dataset.quality = "unknown";
      text.textContent = `Connection: ${pc ? pc.connectionState : "not connected yet"}`;
      return;
    }
    const stats = await pc.getStats();
    let pair = null;
    let lost = 0;
    let received = 0;
    stats.forEach((r) => {
      if (r.type === "transport" && r.selectedCandidatePairId) pair = stats.get(r.selectedCandidatePairId) || pair;
      if (r.type === "candidate-pair" && r.nominated && r.state === "succeeded" && !pair) pair = r;
      if (r.type === "inbound-rtp") { lost += r.packetsLost || 0; received += r.packetsReceived || 0; }
    });
    const dLost = Math.max(0, lost - prevStats.lost);
    const dReceived = Math.max(0, received - prevStats.received);
    prevStats = { lost, received };
    const loss = dLost + dReceived > 0 ? dLost / (dLost + dReceived) : 0;
    const rtt = pair && typeof pair.currentRoundTripTime === "number" ? pair.currentRoundTripTime : null;
    let quality = "good";
    if ((rtt !== null && rtt >= 0.4) || loss >= 0.08) quality = "poor";
    else if ((rtt !== null && rtt >= 0.15) || loss >= 0.02) quality = "fair";
    el.dataset.quality = quality;
    const rttText = rtt === null ? "round trip unknown" : `round trip ${Math.round(rtt * 1000)} ms`;
    text.textContent = `Connection: ${quality} (${rttText}, ${(loss * 100).toFixed(1)}% packets lost)`;
  }

  // ---- chat and files -----------------------------------------------------------------------

  function sizeText(n) {
    if (n >= 1024 * 1024) return `${(n / (1024 * 1024)).toFixed(1)} MB`;
    if (n >= 1024) return `${Math.round(n / 1024)} KB`;
    return `${n} bytes`;
  }

  function showMessage(m) {
    if (!m || !m.id || shown.has(m.id)) return;
    shown.add(m.id);
    const li = document.createElement("li");
    const mine = m.from === cfg.role;
    li.className = mine ? "mine" : "theirs";
    li.dataset.messageId = m.id;
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = mine ? "You" : cfg.counterpart;
    const when = document.createElement("time");
    when.dateTime = m.sent || "";
    const d = new Date(m.sent);
    when.textContent = Number.isNaN(d.getTime()) ? "" : d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    const body = document.createElement("div");
    body.className = "body";
    if (m.file) {
      const a = document.createElement("a");
      a.href = m.file.url;
      a.download = m.file.title;
      a.textContent = m.file.title;
      body.append("Shared a file: ", a, ` (${sizeText(m.file.size || 0)})`);
    } else {
      body.textContent = m.text;
    }
    li.append(who, " ", when, body);
    $("chat-log").append(li);
    li.scrollIntoView({ block: "nearest" });
    if (!mine) $("typing").textContent = "";
  }

  async function loadMessages() {
    const r = await fetch(`${api}/messages`, { credentials: "same-origin" });
    if (!r.ok) return;
    (await r.json()).messages.forEach(showMessage);
  }

  function showTyping() {
    $("typing").textContent = `${cfg.counterpart} is typing…`;
    clearTimeout(typingTimer);
    typingTimer = setTimeout(() => { $("typing").textContent = ""; }, 4000);
  }

  $("chat-text").addEventListener("input", () => {
    const now = Date.now();
    if (now - lastTyping > 3000) { lastTyping = now; send({ type: "typing" }); }
  });
  $("chat-text").addEventListener("keydown", (ev) => {
    // Enter sends, Shift+Enter starts a new line
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      $("chat-form").requestSubmit();
    }
  });

  $("chat-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const box = $("chat-text");
    const text = box.value.trim();
    if (!text) { chatError("Write a message first."); box.focus(); return; }
    if (text.length > cfg.maxChat) {
      chatError(`The message has ${text.length} characters; at most ${cfg.maxChat} fit. Share longer text as a file.`);
      return;
    }
    chatError("");
    const r = await fetch(`${api}/messages`, {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json" }, body: JSON.stringify({ text }),
    });
    if (!r.ok) { chatError(`The message was not sent: ${await problem(r)}`); return; }
    showMessage(await r.json());
    box.value = "";
    box.focus();
  });

  $("file-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const input = $("file-input");
    const file = input.files && input.files[0];
    if (!file) { chatError("Choose a file to share first."); input.focus(); return; }
    if (file.size > cfg.maxFile) {
      chatError(`“${file.name}” is ${sizeText(file.size)}; files may be at most ${sizeText(cfg.maxFile)}.`);
      return;
    }
    if (file.type && !cfg.allowedTypes.includes(file.type)) {
      chatError(`“${file.name}” is of a type that cannot be shared (${file.type}). Share a PDF, PNG, JPEG or plain-text file.`);
      return;
    }
    chatError("");
    const form = new FormData();
    form.append("file", file, file.name);
    const r = await fetch(`${api}/files`, { method: "POST", credentials: "same-origin", body: form });
    if (!r.ok) { chatError(`The file was not shared: ${await problem(r)}`); return; }
    showMessage(await r.json());
    input.value = "";
  });

  // ---- start --------------------------------------------------------------------------------

  localTimes();
  if (room === "ended") {
    loadMessages();
    showEncounterLinks();
  } else {
    if (room === "in-progress") startQualityMonitor();
    connect();
  }
})();
