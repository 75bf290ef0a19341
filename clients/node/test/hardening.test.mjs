// The client side of the brokers' hardening (README "Security and limits"),
// as the Python client does it, against real broker processes: idle PINGs
// keep a link past --idle-timeout; a broker that stops answering (SIGSTOP)
// is found dead by a missed pong and its sent requests end with
// `maybeApplied`; BUSY on a full broker; a token from a file or the
// environment; and a broker back on an empty disk (lost-storage) answering
// UNAVAILABLE, which surfaces as UnavailableError, never as an empty queue.
import assert from "node:assert/strict";
import { renameSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import {
  AuthError, Connection, ConnectionClosedError, JobStateError, OwnerUnavailableError, Queue, ShardqClient,
  UnavailableError, errorFromWire, isLinkError, resolveToken,
} from "../dist/index.js";
import { Sandbox, httpJson, poll, queueOn } from "./helpers.mjs";

describe("wire errors of the hardening and storage identity", () => {
  test("UNAVAILABLE and JOB_STATE map to their classes; UNAVAILABLE is retried as a link error", () => {
    const un = errorFromWire("UNAVAILABLE", "broker b2 cannot serve slot 7: its slots are owned under storage x");
    assert.ok(un instanceof OwnerUnavailableError && un.code === "UNAVAILABLE" && /storage/.test(un.message));
    assert.ok(isLinkError(un));
    const js = errorFromWire("JOB_STATE", { id: "a-3", state: "waiting", message: "job 'a-3' is waiting" });
    assert.ok(js instanceof JobStateError && js.jobId === "a-3" && js.state === "waiting" && !isLinkError(js));
    assert.equal(new UnavailableError("b1", "x").maybeApplied, false);
    assert.match(new UnavailableError("b1", "x", { maybeApplied: true }).message, /outcome unknown/);
  });
});

describe("connections to a standalone broker", () => {
  const sb = new Sandbox();
  after(() => sb.cleanup());

  test("idle PINGs keep a link open past the broker's --idle-timeout", async () => {
    const { addr } = await sb.broker("idle", "--idle-timeout", "0.6");
    const client = new ShardqClient({ brokers: addr, pingIntervalMs: 150, pingTimeoutMs: 2000 });
    const queue = new Queue("idle-q", { connection: client });
    await queue.add("a", {});
    const [conn] = client.cluster.openConnections();
    await poll(async () => conn.pingsSent >= 8, "8 idle pings (1.2 s, twice the idle timeout)");
    assert.equal(conn.closed, false);
    assert.deepEqual(client.cluster.openConnections(), [conn]);
    assert.equal(await queue.getWaitingCount(), 1);
    await client.close();
  });

  test("without pings the broker closes an idle link, and the client re-dials", async () => {
    const { addr } = await sb.broker("idle2", "--idle-timeout", "0.3");
    const client = new ShardqClient({ brokers: addr, pingIntervalMs: 0 });
    const queue = new Queue("idle-q2", { connection: client });
    await queue.add("a", {});
    const [conn] = client.cluster.openConnections();
    await poll(async () => conn.closed, "the broker to close the idle link");
    assert.equal(await queue.getWaitingCount(), 1); // on a new connection
    assert.notEqual(client.cluster.openConnections()[0], conn);
    await client.close();
  });

  test("a missed pong marks a stopped broker's link dead; a request sent unanswered ends maybeApplied", async () => {
    const proc = await sb.broker("stop");
    const client = new ShardqClient({
      brokers: proc.addr, pingIntervalMs: 200, pingTimeoutMs: 300, requestTimeoutMs: 400, connectTimeoutMs: 300,
      retry: { unavailableBudgetMs: 1200 },
    });
    const queue = new Queue("stop-q", { connection: client });
    await queue.add("a", {});
    const [conn] = client.cluster.openConnections();
    const pid = proc.pid;
    // Idle, then the broker stops answering: the idle PING gets no pong.
    process.kill(pid, "SIGSTOP");
    try {
      await poll(async () => conn.closed, "the dead link to be dropped", 5000);
      await assert.rejects(conn.request("PING", {}), /no pong/);
      // Nothing of this add was sent to a broker that answered HELLO: not applied.
      await assert.rejects(queue.add("never", {}), (err) => err instanceof UnavailableError && err.maybeApplied === false);
    } finally {
      process.kill(pid, "SIGCONT");
    }
    await queue.add("b", {}); // re-dialled once the broker answers again
    const [conn2] = client.cluster.openConnections();
    assert.notEqual(conn2, conn);
    process.kill(pid, "SIGSTOP");
    try {
      // Sent on a live link and never answered: the outcome is unknown.
      await assert.rejects(queue.add("unknown", {}), (err) => err instanceof UnavailableError && err.maybeApplied === true
        && /outcome unknown/.test(err.message));
      assert.equal(conn2.closed, true); // the request timeout's PING found the link dead
    } finally {
      process.kill(pid, "SIGCONT");
    }
    await queue.add("c", {});
    assert.ok((await queue.getWaitingCount()) >= 3);
    await client.close();
  });

  test("a broker at --max-connections answers HELLO BUSY; the client backs off, then gives up", async () => {
    const { addr } = await sb.broker("full", "--max-connections", "1");
    const first = new ShardqClient({ brokers: addr });
    await first.call("busy-q", "PING", {});
    const second = new ShardqClient({ brokers: addr, retry: { busyBudgetMs: 300, unavailableBudgetMs: 300 } });
    await assert.rejects(second.ready(), (err) => err instanceof UnavailableError && /limit of 1 connections/.test(err.message));
    await first.close();
    // A failed first load is not kept: once the slot is free, the same client connects.
    await poll(async () => { try { await second.ready(); return true; } catch { return false; } }, "a free connection slot", 10_000);
    await second.call("busy-q", "PING", {});
    await second.close();
  });

  test("the token comes from tokenFile, else SHARDQ_TOKEN", async () => {
    const file = join(sb.dir, "client.token");
    writeFileSync(file, "s3cret-file\n", { mode: 0o600 });
    const { addr } = await sb.broker("tok", "--token-file", file);
    const byFile = new ShardqClient({ brokers: addr, tokenFile: file });
    assert.equal(byFile.token, "s3cret-file");
    await byFile.call("tok-q", "PING", {});
    await byFile.close();
    const saved = process.env.SHARDQ_TOKEN;
    process.env.SHARDQ_TOKEN = "s3cret-file";
    try {
      assert.equal(resolveToken(undefined, undefined), "s3cret-file");
      const byEnv = new ShardqClient({ brokers: addr });
      await byEnv.call("tok-q", "PING", {});
      await byEnv.close();
      process.env.SHARDQ_TOKEN = "wrong";
      const wrong = new ShardqClient({ brokers: addr });
      await assert.rejects(wrong.ready(), AuthError);
      await wrong.close();
    } finally {
      if (saved === undefined) delete process.env.SHARDQ_TOKEN; else process.env.SHARDQ_TOKEN = saved;
    }
    writeFileSync(file, "\n");
    assert.throws(() => resolveToken(undefined, file), /is empty/);
  });
});

describe("roles", () => {
  const sb = new Sandbox();
  after(() => sb.cleanup());

  test("a client-token connection is role client and cannot send a control op", async () => {
    const { addr } = await sb.broker("roles", "--token", "client-t", "--control-token", "control-t");
    const conn = await Connection.open(addr, { token: "client-t" });
    assert.equal(conn.role, "client");
    await assert.rejects(conn.request("HANDOFF_STATUS", { move_id: "m1" }), (err) => err instanceof AuthError && /control/.test(err.message));
    assert.equal(await conn.request("PING", {}), "pong");
    conn.abort();
    const control = await Connection.open(addr, { token: "control-t" });
    assert.equal(control.role, "control");
    control.abort();
  });
});

describe("a broker back on an empty disk (lost-storage)", () => {
  const sb = new Sandbox();
  let cl;
  before(async () => { cl = await sb.cluster(3); });
  after(() => sb.cleanup());

  test("its queues raise UnavailableError naming the storage, until forget", async () => {
    const client = new ShardqClient({ url: cl.url, retry: { unavailableBudgetMs: 1000, tryAgainBudgetMs: 1000 } });
    await client.ready();
    const name = queueOn(client.topology.topo, "b2", "lost");
    const queue = new Queue(name, { connection: client });
    await queue.addBulk(Array.from({ length: 20 }, (_, i) => ({ name: "j", data: { i } })));
    const before = client.topology.topo.brokers.get("b2");
    assert.match(before.storage ?? "", /^[0-9a-f]{32}$/);

    // The disk is lost: the broker dies, its directory goes, it comes back under its id.
    await cl.brokers.b2.kill();
    renameSync(join(sb.dir, "b2-data"), join(sb.dir, "b2-lost-disk"));
    cl.brokers.b2 = await sb.broker("b2", "--coordinator", cl.url);
    await poll(async () => {
      const t = await httpJson(cl.url, "/topology");
      return t?.brokers?.b2?.state === "lost-storage" && t.brokers.b2.addr === cl.brokers.b2.addr;
    }, "b2 held as lost-storage at its new address");
    await client.refreshTopology();
    assert.equal(client.topology.topo.brokers.get("b2").state, "lost-storage");
    assert.equal(client.topology.topo.brokers.get("b2").storage, before.storage); // the recorded disk

    for (const call of [() => queue.getJobCounts(), () => queue.add("after-loss", {}), () => queue.addBulk([{ name: "bulk", data: {} }])]) {
      await assert.rejects(call(), (err) => err instanceof UnavailableError && /b2/.test(err.message)
        && /storage/.test(err.message));
    }

    const forgot = await client.coordinatorPost("/brokers/b2/forget", { accept_data_loss: true });
    assert.ok(forgot);
    await poll(async () => (await httpJson(cl.url, "/topology"))?.brokers?.b2?.state === "active", "b2 active again");
    await client.refreshTopology();
    const counts = await poll(async () => {
      try { return await queue.getJobCounts("waiting"); } catch (err) { if (err instanceof UnavailableError) return null; throw err; }
    }, "b2 to serve its slots again, empty");
    assert.deepEqual(counts, { waiting: 0 }); // the loss was accepted
    await client.close();
  });
});
