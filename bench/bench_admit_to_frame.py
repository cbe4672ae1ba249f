"""Admit-to-first-frame benchmark: how long after the practitioner presses "Admit" do both
people see each other, in a real browser on loopback; against the bare WebRTC set-up in the same
browser as the baseline.

    python bench/bench_admit_to_frame.py [--runs 7] [--chromium /usr/bin/chromium]

It starts ``teleledger serve`` (fresh temporary home, SQLite), creates a patient and a
practitioner with their accounts, and signs each in from their own Chromium context (fake
camera and microphone: ``--use-fake-device-for-media-stream --use-fake-ui-for-media-stream``).
Each run books a new visit starting now; the patient opens the room and waits, the practitioner
opens it and sees her waiting. Then, timed in the page (``performance.timeOrigin +
performance.now()``, the same clock in both pages of one browser):

* t0: the practitioner's click on "Admit" (the script clicks it from the page itself);
* the first frame of the *other* person's video presented in each page
  (``HTMLVideoElement.requestVideoFrameCallback`` on the remote video).

What lies between: the admission request (Encounter created and Appointment updated in one
transaction), the "admitted" event to both, camera and microphone start-up (the room asks for
them on admission), "ready", offer, answer and ICE candidates through the signaling hub, ICE and
DTLS, the first decoded frame.

Baseline, in the same browser and session: two RTCPeerConnections in one page connected
directly (offer, answer and candidates handed over in memory), each with its own fake camera
from ``getUserMedia``: t0 before ``getUserMedia``, end at the first remote frame of both.

Target: admit to first remote frame <= 1.5 s (median, the later of the two sides).
"""

from __future__ import annotations

import argparse
import base64
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
from rich.bar import Bar
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

HOST = "127.0.0.1"
CLIENT_ID, CLIENT_SECRET = "bench", "bench-secret-0123456789"
PASSWORD = "bench-password-123"
TARGET_S = 1.5
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--use-fake-device-for-media-stream",
                "--use-fake-ui-for-media-stream"]
WAIT_MS = 30_000

console = Console() if sys.stdout.isatty() else Console(width=120)

# resolves with the time the first frame of the remote video is presented
HOOK_FIRST_FRAME = """() => {
    const v = document.getElementById('remote-video');
    window.__firstFrame = new Promise((resolve) => {
        v.requestVideoFrameCallback((now) => resolve(performance.timeOrigin + now));
    });
}"""
CLICK_ADMIT = """() => {
    const t0 = performance.timeOrigin + performance.now();
    document.getElementById('admit').click();
    return t0;
}"""
BASELINE = """async () => {
    const firstFrame = (stream) => new Promise((resolve) => {
        const v = document.createElement('video');
        v.muted = true; v.autoplay = true; v.playsInline = true;
        document.body.append(v);
        v.requestVideoFrameCallback((now) => resolve(performance.timeOrigin + now));
        v.srcObject = stream;
    });
    const t0 = performance.timeOrigin + performance.now();
    const [s1, s2] = await Promise.all([
        navigator.mediaDevices.getUserMedia({video: true, audio: true}),
        navigator.mediaDevices.getUserMedia({video: true, audio: true})]);
    const a = new RTCPeerConnection(), b = new RTCPeerConnection();
    a.onicecandidate = (e) => e.candidate && b.addIceCandidate(e.candidate);
    b.onicecandidate = (e) => e.candidate && a.addIceCandidate(e.candidate);
    const atB = new Promise((r) => { b.ontrack = (e) => r(firstFrame(e.streams[0])); });
    const atA = new Promise((r) => { a.ontrack = (e) => r(firstFrame(e.streams[0])); });
    s1.getTracks().forEach((t) => a.addTrack(t, s1));
    s2.getTracks().forEach((t) => b.addTrack(t, s2));
    await a.setLocalDescription(await a.createOffer());
    await b.setRemoteDescription(a.localDescription);
    await b.setLocalDescription(await b.createAnswer());
    await a.setRemoteDescription(b.localDescription);
    const [fb, fa] = await Promise.all([atB, atA]);
    const out = {first: Math.min(fa, fb) - t0, both: Math.max(fa, fb) - t0};
    a.close(); b.close();
    [s1, s2].forEach((s) => s.getTracks().forEach((t) => t.stop()));
    document.querySelectorAll('video').forEach((v) => v.remove());
    return out;
}"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def teleledger_command() -> list[str]:
    exe = Path(sys.executable).with_name("teleledger")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "teleledger.cli"]


def cli(env: dict[str, str], *args: str) -> None:
    done = subprocess.run([*teleledger_command(), *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"teleledger {' '.join(args[:2])} failed:\n{done.stdout}{done.stderr}")


def instant(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


class Site:
    def __init__(self, workdir: Path) -> None:
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TELELEDGER_")}
        self.env.update(TELELEDGER_HOME=str(workdir / "home"), TELELEDGER_DEMO_DATA="false",
                        TELELEDGER_PASSWORD_HASHING="fast", TELELEDGER_ENVIRONMENT="test",
                        TELELEDGER_MASTER_KEY=base64.b64encode(os.urandom(32)).decode())
        cli(self.env, "clients", "create", "--client-id", CLIENT_ID, "--secret", CLIENT_SECRET, "--scope",
            "system/*.cruds")
        self.port = free_port()
        self.base = f"http://{HOST}:{self.port}"
        self.log = workdir / "server.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen([*teleledger_command(), "serve", "--host", HOST, "--port", str(self.port)],
                                         env=self.env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{self.base}/fhir/metadata", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"teleledger did not start:\n{self.log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)
        tok = httpx.post(f"{self.base}/auth/token", data={"grant_type": "client_credentials", "client_id": CLIENT_ID,
                                                           "client_secret": CLIENT_SECRET}, timeout=30).json()
        self.svc = {"Authorization": f"Bearer {tok['access_token']}", "Content-Type": "application/fhir+json"}
        self.patient = self.create({"resourceType": "Patient", "name": [{"family": "Bench", "given": ["Pat"]}]})
        self.doctor = self.create({"resourceType": "Practitioner", "name": [{"family": "Bench", "given": ["Doc"]}]})
        cli(self.env, "users", "create", "--role", "patient", "--username", "bench-patient", "--password", PASSWORD,
            "--patient", f"Patient/{self.patient}")
        cli(self.env, "users", "create", "--role", "practitioner", "--username", "bench-doctor", "--password",
            PASSWORD, "--practitioner", f"Practitioner/{self.doctor}")

    def create(self, resource: dict) -> str:
        r = httpx.post(f"{self.base}/fhir/{resource['resourceType']}", json=resource, headers=self.svc, timeout=30)
        if r.status_code != 201:
            raise SystemExit(f"creating a {resource['resourceType']} answered {r.status_code}: {r.text}")
        return r.json()["id"]

    def book(self) -> str:
        now = datetime.now(timezone.utc)
        return self.create({"resourceType": "Appointment", "status": "booked",
                            "start": instant(now - timedelta(minutes=1)), "end": instant(now + timedelta(minutes=30)),
                            "participant": [{"actor": {"reference": f"Patient/{self.patient}"}, "status": "accepted"},
                                            {"actor": {"reference": f"Practitioner/{self.doctor}"},
                                             "status": "accepted"}]})

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def signed_in(browser, site: Site, username: str):  # type: ignore[no-untyped-def]
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    page.goto(f"{site.base}/login")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{site.base}/portal")
    return context, page


def one_visit(site: Site, patient, doctor) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """(seconds until the practitioner sees the patient, seconds until the patient sees the practitioner)."""
    appt = site.book()
    room = f"{site.base}/visits/{appt}/room"
    patient.goto(room)
    patient.wait_for_function("() => window.teleledgerVisit && window.teleledgerVisit.state().signaling === 1")
    doctor.goto(room)
    doctor.wait_for_function("() => !document.getElementById('admit').disabled")
    for page in (patient, doctor):
        page.evaluate(HOOK_FIRST_FRAME)
    t0 = doctor.evaluate(CLICK_ADMIT)
    seen_by_doctor = doctor.evaluate("() => window.__firstFrame")
    seen_by_patient = patient.evaluate("() => window.__firstFrame")
    doctor.evaluate("() => document.getElementById('end-visit').click()")
    doctor.evaluate("() => document.getElementById('end-yes').click()")
    doctor.wait_for_function("() => window.teleledgerVisit.state().room === 'ended'")
    return (seen_by_doctor - t0) / 1000, (seen_by_patient - t0) / 1000


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="visits to time (default 7)")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="the Chromium to drive")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (server log, database)")
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    workdir = Path(tempfile.mkdtemp(prefix="bench-admit-"))
    site = None
    rows: list[tuple[str, float, float]] = []
    try:
        with console.status("starting teleledger and creating the accounts"):
            site = Site(workdir)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=BROWSER_ARGS, timeout=60_000)
            try:
                pctx, patient = signed_in(browser, site, "bench-patient")
                dctx, doctor = signed_in(browser, site, "bench-doctor")
                bctx = browser.new_context()
                bpage = bctx.new_page()
                bpage.goto(f"{site.base}/")
                with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                              console=console) as progress:
                    task = progress.add_task("visits (alternating with the baseline)", total=args.runs)
                    one_visit(site, patient, doctor)  # warm-up: first codec and page loads
                    bpage.evaluate(BASELINE)
                    for _ in range(args.runs):
                        base = bpage.evaluate(BASELINE)
                        rows.append(("baseline", base["first"] / 1000, base["both"] / 1000))
                        d, p = one_visit(site, patient, doctor)
                        rows.append(("teleledger", min(d, p), max(d, p)))
                        progress.advance(task)
            finally:
                browser.close()
    finally:
        if site is not None:
            site.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown")
    console.print(f"\n[bold]Admit to first remote video frame[/] — {args.runs} runs, loopback, host candidates only; "
                  f"{len(os.sched_getaffinity(0))} CPUs ({model}), Python {platform.python_version()}, "
                  f"load before {load}")
    table = Table()
    for col in ("", "first side, median s", "both sides, median s", "both sides, p95 s", "min s", "max s"):
        table.add_column(col, justify="right" if col else "left")
    summary = {}
    for name in ("baseline", "teleledger"):
        firsts = [r[1] for r in rows if r[0] == name]
        boths = [r[2] for r in rows if r[0] == name]
        summary[name] = statistics.median(boths)
        table.add_row(name, f"{statistics.median(firsts):.3f}", f"{statistics.median(boths):.3f}",
                      f"{percentile(boths, 95):.3f}", f"{min(boths):.3f}", f"{max(boths):.3f}")
    console.print(table)
    console.print("each run (both sides, s): teleledger " +
                  ", ".join(f"{r[2]:.3f}" for r in rows if r[0] == "teleledger") +
                  "; baseline " + ", ".join(f"{r[2]:.3f}" for r in rows if r[0] == "baseline"))
    chart = Table(title="median seconds until both see each other", show_header=False, box=None, padding=(0, 1))
    chart.add_column(justify="right")
    chart.add_column(width=50)
    chart.add_column(justify="right")
    top = max(TARGET_S, *summary.values()) * 1.05
    for name, v in summary.items():
        chart.add_row(name, Bar(top, 0, v, width=50, color="cyan" if name == "baseline" else "magenta"), f"{v:.3f}")
    chart.add_row("target", Bar(top, 0, TARGET_S, width=50, color="grey50"), f"{TARGET_S:g}")
    console.print(chart)
    ratio = summary["teleledger"] / summary["baseline"]
    ok = summary["teleledger"] <= TARGET_S
    console.print(f"teleledger / baseline: {ratio:.2f}x. Target: median admit to first frame (both sides) <= "
                  f"{TARGET_S:g} s — [bold]{'met' if ok else 'NOT met'}[/].")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
