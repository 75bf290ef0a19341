// A coordinator and three brokers: client-side routing, partitions, and a
// queue moved between brokers while producers and a worker keep going.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { Connection, MovedError, Queue, QueueEvents, ShardqClient, TryAgainError, Worker } from "../dist/index.js";
import { Sandbox, httpJson, once, poll, queueOn } from "./helpers.mjs";

async function brokerCall(addr, op, args) {
  const conn = await Connection.open(addr);
  try {
    return await conn.request(op, args);
  } finally {
    conn.abort();
  }
}

describe("3-broker cluster", () => {
  const sb = new Sandbox();
  let c;
  let client;
  before(async () => {
    c = await sb.cluster(3);
    client = new ShardqClient(c.url);
    await client.ready();
  });
  after(async () => { await client?.close(); await sb.cleanup(); });

  test("each queue is routed to its slot's owner, and workers drain all three", async () => {
    const names = ["b1", "b2", "b3"].map((b) => queueOn(c.topo, b, "route"));
    const queues = names.map((n) => new Queue(n, { connection: client }));
    await Promise.all(queues.map((q, i) => q.addBulk(Array.from({ length: 100 * (i + 1) }, (_, k) => ({ name: "r", data: { k } })))));
    for (const [i, b] of ["b1", "b2", "b3"].entries()) {
      const served = await brokerCall(c.brokers[b].addr, "QUEUES", {});
      assert.equal(served[names[i]]?.waiting, 100 * (i + 1), `${names[i]} on ${b}`);
      for (const other of names.filter((_, j) => j !== i)) assert.equal(served[other], undefined, `${other} is not on ${b}`);
    }
    const done = new Set();
    const workers = names.map((n) => new Worker(n, async (job) => job.data.k, { connection: client, concurrency: 16 }));
    for (const w of workers) w.on("completed", (job) => done.add(job.id));
    await poll(() => done.size === 600, "600 completions over 3 brokers");
    await Promise.all(workers.map((w) => w.close()));
    assert.equal(client.stats.moved, 0);
  });

  test("a partitioned queue spreads over brokers and one worker pulls from every partition", async () => {
    await client.declareQueue("wide", 6);
    const queue = new Queue("wide", { connection: client });
    assert.equal(queue.partitions().length, 6);
    const owners = new Set(queue.partitions().map((p) => client.topology.route(p)[0]));
    assert.ok(owners.size >= 2, `6 partitions on ${owners.size} broker(s)`);
    await queue.addBulk(Array.from({ length: 300 }, (_, i) => ({ name: "w", data: i, opts: { partitionKey: `tenant-${i % 10}` } })));
    assert.equal(await queue.count(), 300);
    const done = new Set();
    const worker = new Worker("wide", async () => "ok", { connection: client, concurrency: 12 });
    worker.on("completed", (job) => done.add(job.id));
    await poll(() => done.size === 300, "300 completions from 6 partitions");
    await worker.close();
    assert.equal(await queue.count(), 0);
  });

  test("a MOVED during a handoff is followed: no add lost, an active job's ack lands at the new owner", async () => {
    const name = queueOn(c.topo, "b1", "moving");
    const queue = new Queue(name, { connection: client });
    // A client that loaded the map before the move and stays idle through it.
    const stale = new ShardqClient(c.url);
    await stale.ready();
    await queue.add("held", { v: 0 }, { jobId: "held" });
    const events = new QueueEvents(name, { connection: client });
    await events.waitUntilReady();
    const heldDone = once(events, "completed", 30_000, (e) => e.jobId === "held");
    let release;
    const held = new Promise((r) => (release = r));
    const worker = new Worker(name, async (job) => (job.id === "held" ? held.then(() => "acked at b2") : "ok"),
      { connection: client, concurrency: 4 });
    await once(worker, "active", 10_000, (job) => job.id === "held");
    const answered = [];
    let stop = false;
    const producer = (async () => {
      while (!stop) answered.push(...(await queue.addBulk(Array.from({ length: 20 }, (_, i) => ({ name: "m", data: i })))).map((j) => j.id));
    })();
    const { slot } = await httpJson(c.url, `/queues/${name}/move`, { to: "b2" });
    await poll(async () => {
      try {
        await brokerCall(c.brokers.b1.addr, "COUNTS", { queue: name });
        return false;
      } catch (err) {
        return err instanceof MovedError && err.owner === "b2" && err.slot === slot;
      }
    }, "b1 to answer MOVED for the moved slot");
    stop = true;
    await producer;
    // The busy client learnt the new map from the epoch its replies carry (or a MOVED).
    const coordEpoch = (await httpJson(c.url, "/topology")).epoch;
    await queue.getJobCounts();
    await poll(() => client.topology.topo.epoch >= coordEpoch, "the client's map to reach the coordinator's epoch", 10_000);
    assert.ok(client.topology.refreshes >= 1, "a newer epoch triggered a full refresh");
    assert.equal(client.topology.route(name)[0], "b2");
    const completed = once(worker, "completed", 20_000, (job) => job.id === "held");
    release();
    const [, result] = await completed;
    assert.equal(result, "acked at b2");
    // The event subscription followed the queue to b2 and resumed where it was.
    const [event] = await heldDone;
    assert.equal(event.returnvalue, "acked at b2");
    await events.close();

    const staleQueue = new Queue(name, { connection: stale });
    await staleQueue.add("late", {}, { jobId: "after-move" });
    assert.ok(stale.stats.moved >= 1, "the stale client was redirected by MOVED");
    assert.equal(stale.topology.route(name)[0], "b2");
    const served = await brokerCall(c.brokers.b2.addr, "GET_JOB", { queue: name, id: "after-move" });
    assert.equal(served.id, "after-move");
    await worker.close();
    for (const id of answered.filter((_, i) => i % 13 === 0)) assert.ok(await queue.getJob(id), `answered job ${id} lost in the move`);
    const held2 = await queue.getJob("held");
    assert.equal(held2.state, "completed");
    assert.equal(held2.returnvalue, "acked at b2");
    await staleQueue.close();
    await stale.close();
  });
});

describe("a handoff held frozen", () => {
  const sb = new Sandbox();
  after(() => sb.cleanup());

  test("TRYAGAIN while the slot is frozen is ridden out, then the add lands at the new owner", async () => {
    // The coordinator sleeps 1.5 s right after the source froze the slot (a failpoint):
    // writes to it answer TRYAGAIN for that long, within the client's 5 s budget.
    const c = await sb.cluster(2, { coordinatorEnv: { SHARDQ_FAILPOINTS: "coordinator.after_freeze=sleep(1500)" } });
    const client = new ShardqClient(c.url);
    await client.ready();
    const name = queueOn(c.topo, "b1", "frozen");
    const queue = new Queue(name, { connection: client });
    await queue.add("before", {}, { jobId: "before" });
    await httpJson(c.url, `/queues/${name}/move`, { to: "b2" });
    await poll(async () => {
      try {
        await brokerCall(c.brokers.b1.addr, "ADD", { queue: name, jobs: [] });
        return false;
      } catch (err) {
        return err instanceof TryAgainError;
      }
    }, "b1 to answer TRYAGAIN for the frozen slot");
    const t0 = performance.now();
    const job = await queue.add("during", { v: 1 }, { jobId: "during" });
    assert.equal(job.id, "during");
    assert.ok(client.stats.tryAgain >= 1, "the add met TRYAGAIN");
    assert.ok(performance.now() - t0 < 5000, "within the TRYAGAIN budget");
    await poll(() => client.topology.route(name)?.[0] === "b2" || client.refreshTopology().then(() => false), "the map to name b2");
    assert.ok(await brokerCall(c.brokers.b2.addr, "GET_JOB", { queue: name, id: "during" }));
    assert.ok(await brokerCall(c.brokers.b2.addr, "GET_JOB", { queue: name, id: "before" }));
    await queue.close();
    await client.close();
  });
});
