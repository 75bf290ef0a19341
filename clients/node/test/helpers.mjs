// Real broker and coordinator processes for the tests, started from the
// repository's Python venv with `--port 0`; each address is read from the
// process's `READY host:port` line, and every process is killed by its pid
// (process group) when the test ends.
import { spawn } from "node:child_process";
import { mkdtempSync, openSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { Connection, Topology } from "../dist/index.js";

export const REPO = resolve(dirname(fileURLToPath(import.meta.url)), "../../..");
export const PYTHON = process.env.SHARDQ_PYTHON ?? join(REPO, ".venv/bin/python");
const READY_TIMEOUT_MS = 20_000;
const WAIT_MS = 30_000;

export class Proc {
  constructor(args, { env = {}, logPath } = {}) {
    this.args = args;
    this.logPath = logPath;
    const log = logPath ? openSync(logPath, "a") : "ignore";
    this.child = spawn(PYTHON, ["-m", "shardq", ...args], {
      cwd: REPO, detached: true, stdio: ["ignore", "pipe", log],
      env: { ...process.env, PYTHONUNBUFFERED: "1", ...env },
    });
    this.exited = new Promise((r) => this.child.once("exit", (code, signal) => r({ code, signal })));
    this.ready = new Promise((resolveReady, reject) => {
      let buf = "";
      const timer = setTimeout(() => { this.kill(); reject(new Error(`${args.join(" ")} did not print READY\n${this.logTail()}`)); }, READY_TIMEOUT_MS);
      this.child.stdout.on("data", (chunk) => {
        if (this.addr) return; // keep draining so the child never blocks
        buf += chunk.toString();
        const m = /READY (\S+)/.exec(buf);
        if (m) { clearTimeout(timer); this.addr = m[1]; resolveReady(this); }
      });
      this.child.once("exit", () => { clearTimeout(timer); if (!this.addr) reject(new Error(`${args.join(" ")} exited before READY\n${this.logTail()}`)); });
    });
  }

  get pid() { return this.child.pid; }
  get alive() { return this.child.exitCode === null && this.child.signalCode === null; }

  /** kill -9 the process group, by pid; resolves once it exited. */
  async kill() {
    if (this.alive) {
      try { process.kill(-this.child.pid, "SIGKILL"); } catch { /* already gone */ }
    }
    await this.exited;
  }

  logTail(n = 3000) {
    try { return readFileSync(this.logPath, "utf8").slice(-n); } catch { return ""; }
  }
}

/** A scratch directory and the processes of one test; `cleanup()` kills and removes all. */
export class Sandbox {
  constructor() {
    this.dir = mkdtempSync(join(tmpdir(), "shardq-node-test-"));
    this.procs = [];
    this.n = 0;
  }

  async start(args, opts = {}) {
    const p = new Proc(args, { ...opts, logPath: join(this.dir, `${args[0]}-${++this.n}.log`) });
    this.procs.push(p);
    return p.ready;
  }

  /** A broker on a free port with its own data dir (kept across restarts of the same id). */
  broker(id = "b1", ...extra) {
    return this.start(["broker", "--id", id, "--port", "0", "--bind", "127.0.0.1", "--data-dir", join(this.dir, `${id}-data`), ...extra]);
  }

  /** A coordinator and `n` brokers b1..bn, bootstrapped, each serving the coordinator's map. */
  async cluster(n = 3, { coordinatorEnv = {} } = {}) {
    const coord = await this.start(["coordinator", "--port", "0", "--data-dir", join(this.dir, "coordinator"), "--expect", String(n)],
      { env: coordinatorEnv });
    const url = `http://${coord.addr}`;
    const brokers = {};
    await Promise.all(Array.from({ length: n }, (_, i) => `b${i + 1}`).map(async (id) => {
      brokers[id] = await this.broker(id, "--coordinator", url);
    }));
    const topo = await poll(async () => {
      const t = await httpJson(url, "/topology");
      if (!t) return null;
      const topo = Topology.fromDict(t);
      const owners = new Set(topo.slotOwners);
      if (Object.keys(brokers).some((b) => !owners.has(b))) return null;
      for (const b of Object.keys(brokers)) {
        if ((await brokerEpoch(topo.brokers.get(b).addr)) !== topo.epoch) return null;
      }
      return topo;
    }, "every broker to serve the coordinator's map");
    return { url, coord, brokers, topo };
  }

  logs() {
    return this.procs.map((p) => `--- ${p.args.slice(0, 3).join(" ")}\n${p.logTail()}`).join("\n");
  }

  async cleanup() {
    await Promise.all(this.procs.map((p) => p.kill()));
    rmSync(this.dir, { recursive: true, force: true });
  }
}

export async function httpJson(url, path, body) {
  try {
    const resp = await fetch(url + path, body === undefined ? {} : {
      method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body),
    });
    return resp.ok ? await resp.json() : null;
  } catch {
    return null;
  }
}

export async function brokerEpoch(addr) {
  let conn;
  try {
    conn = await Connection.open(addr);
    const t = await conn.request("TOPOLOGY", {});
    return t ? Number(t.epoch) : 0;
  } catch {
    return 0;
  } finally {
    conn?.abort();
  }
}

/** Poll `cond` until truthy (process and HTTP states have no event to await). */
export async function poll(cond, what, timeoutMs = WAIT_MS) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await cond();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** The first queue name `${prefix}-N` that `owner` owns in `topo`. */
export function queueOn(topo, owner, prefix) {
  for (let i = 0; i < 100_000; i++) {
    const name = `${prefix}-${i}`;
    if (topo.route(name)?.[0] === owner) return name;
  }
  throw new Error(`no ${prefix}-* queue on ${owner}`);
}

/** Resolves with the first emission of `event` (args array); rejects after `timeoutMs`. */
export function once(emitter, event, timeoutMs = WAIT_MS, filter = () => true) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => { emitter.off(event, on); reject(new Error(`no ${event} within ${timeoutMs} ms`)); }, timeoutMs);
    function on(...args) {
      if (!filter(...args)) return;
      clearTimeout(timer);
      emitter.off(event, on);
      resolve(args);
    }
    emitter.on(event, on);
  });
}

/** Run Python code from the repo's venv; resolves with its stdout (rejects on a non-zero exit). */
export function runPython(code, env = {}, timeoutMs = 60_000) {
  return new Promise((resolveRun, reject) => {
    const child = spawn(PYTHON, ["-c", code], { cwd: REPO, env: { ...process.env, ...env }, stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    let err = "";
    child.stdout.on("data", (c) => (out += c));
    child.stderr.on("data", (c) => (err += c));
    const timer = setTimeout(() => child.kill("SIGKILL"), timeoutMs);
    child.once("exit", (code) => {
      clearTimeout(timer);
      if (code === 0) resolveRun(out);
      else reject(new Error(`python exited ${code}\n${err.slice(-3000)}`));
    });
  });
}
