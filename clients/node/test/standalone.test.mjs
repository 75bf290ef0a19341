// The BullMQ-shaped API against one real standalone broker.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import {
  AuthError, BadRequestError, FlowProducer, LockLostError, Queue, QueueEvents, ShardqClient, Worker,
} from "../dist/index.js";
import { Sandbox, once, poll } from "./helpers.mjs";

describe("standalone broker", () => {
  const sb = new Sandbox();
  let client;
  let n = 0;
  const fresh = (p) => `${p}-${++n}`;
  before(async () => {
    const broker = await sb.broker("b1");
    client = new ShardqClient(broker.addr);
    await client.ready();
  });
  after(async () => { await client?.close(); await sb.cleanup(); });

  test("add, getJob, getJobCounts, pause/resume, drain, obliterate", async () => {
    const queue = new Queue(fresh("emails"), { connection: client });
    const job = await queue.add("send", { to: "a@b", n: 2 ** 40 }, { priority: 3, attempts: 2, backoff: { type: "exponential", delay: 100 } });
    assert.match(job.id, /^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
    const got = await queue.getJob(job.id);
    assert.equal(got.name, "send");
    assert.deepEqual(got.data, { to: "a@b", n: 2 ** 40 });
    assert.equal(got.state, "waiting");
    assert.equal(got.opts.priority, 3);
    assert.equal(got.opts.attempts, 2);
    assert.equal(await queue.getJob("nope"), undefined);
    await queue.add("later", {}, { delay: 60_000 });
    await queue.add("plain", {});
    // As BullMQ: a job with a priority counts as prioritized, not waiting.
    assert.deepEqual(await queue.getJobCounts("waiting", "prioritized", "delayed", "active"),
      { waiting: 1, prioritized: 1, delayed: 1, active: 0 });
    await queue.pause();
    assert.equal(await queue.isPaused(), true);
    assert.deepEqual(await queue.getJobCounts("waiting", "paused"), { waiting: 0, paused: 1 });
    await queue.resume();
    assert.equal(await queue.count(), 3);
    await queue.drain();
    assert.deepEqual(await queue.getJobCounts("waiting", "prioritized", "delayed"), { waiting: 0, prioritized: 0, delayed: 1 });
    await queue.obliterate();
    assert.equal(await queue.count(), 0);
  });

  test("concurrent adds are batched into few ADD frames, and a jobId is idempotent", async () => {
    const queue = new Queue(fresh("burst"), { connection: client });
    const before = client.addFrames;
    const jobs = await Promise.all(Array.from({ length: 2000 }, (_, i) => queue.add("j", { i })));
    assert.equal(new Set(jobs.map((j) => j.id)).size, 2000);
    assert.ok(client.addFrames - before <= 2, `2000 concurrent adds took ${client.addFrames - before} frames`);
    const a = await queue.add("x", { v: 1 }, { jobId: "same" });
    const b = await queue.add("x", { v: 2 }, { jobId: "same" });
    assert.equal(a.id, "same");
    assert.equal(b.id, "same");
    assert.deepEqual((await queue.getJob("same")).data, { v: 1 });
    const bulk = await queue.addBulk(Array.from({ length: 7000 }, (_, i) => ({ name: "b", data: i })));
    assert.equal(bulk.length, 7000);
    assert.equal(await queue.getWaitingCount(), 2000 + 1 + 7000);
  });

  test("bad input gets typed errors", async () => {
    const queue = new Queue(fresh("bad"), { connection: client });
    await assert.rejects(queue.add("x", {}, { priority: -1 }), BadRequestError);
    await assert.rejects(queue.add("x", {}, { lifo: true }), BadRequestError);
    await assert.rejects(queue.add("x", {}, { jobId: "x".repeat(300) }), BadRequestError);
    await assert.rejects(queue.upsertJobScheduler("s", { pattern: "not a cron" }), BadRequestError);
  });

  test("a worker runs jobs with concurrency; completed, failed, progress, logs and retries", async () => {
    const queue = new Queue(fresh("work"), { connection: client });
    let running = 0;
    let peak = 0;
    const worker = new Worker(queue.name, async (job) => {
      running++;
      peak = Math.max(peak, running);
      await job.updateProgress(50);
      await job.log(`line for ${job.id}`);
      await new Promise((r) => setTimeout(r, 20));
      running--;
      if (job.data.fail && job.attemptsMade === 0) throw new Error("first try fails");
      return { double: job.data.i * 2 };
    }, { connection: client, concurrency: 8 });
    const completed = new Map();
    const failed = [];
    worker.on("completed", (job, result) => completed.set(job.id, result));
    worker.on("failed", (job, err) => failed.push([job.id, err.message]));
    const jobs = await queue.addBulk(Array.from({ length: 40 }, (_, i) => ({ name: "w", data: { i, fail: i === 3 }, opts: { attempts: 2 } })));
    await poll(() => completed.size === 40, "40 completions");
    assert.ok(peak > 1 && peak <= 8, `peak concurrency ${peak}`);
    assert.deepEqual(completed.get(jobs[5].id), { double: 10 });
    assert.deepEqual(failed, [[jobs[3].id, "first try fails"]]);
    const done = await queue.getJob(jobs[3].id);
    assert.equal(done.state, "completed");
    assert.equal(done.attemptsMade, 2);
    assert.deepEqual(done.returnvalue, { double: 6 });
    assert.equal(done.progress, 50);
    assert.deepEqual((await queue.getJobLogs(jobs[3].id)).logs, [`line for ${jobs[3].id}`, `line for ${jobs[3].id}`]);
    await worker.close();
    assert.equal(worker.isRunning(), false);
  });

  test("a stalled job is redelivered and the first worker's late ack is refused", async () => {
    const queue = new Queue(fresh("stall"), { connection: client });
    const { id } = await queue.add("slow", { v: 1 }, { attempts: 1 });
    let release;
    const held = new Promise((r) => (release = r));
    // Lock of 500 ms, renewed only after 60 s: the lock runs out while the processor waits.
    const first = new Worker(queue.name, async () => { await held; return "late"; },
      { connection: client, lockDuration: 500, lockRenewTime: 60_000 });
    const [activeJob] = await once(first, "active");
    assert.equal(activeJob.id, id);
    const second = new Worker(queue.name, async (job) => `redelivered #${job.attemptsStarted}`, { connection: client });
    const [job2, result2] = await once(second, "completed");
    assert.equal(job2.id, id);
    assert.equal(result2, "redelivered #2");
    const lost = once(first, "lockLost");
    release();
    const [lostJob] = await lost;
    assert.equal(lostJob.id, id);
    const final = await queue.getJob(id);
    assert.equal(final.state, "completed");
    assert.equal(final.returnvalue, "redelivered #2");
    assert.equal(final.stalledCounter, 1);
    assert.equal(first.completedCount, 0);
    // The raw wire says the same: the first delivery's token is refused.
    const outcome = await client.cluster.bulk("ACK", [[queue.name, id, activeJob.token, null]], (it) => it[0], (_b, items) => ({ items }));
    assert.ok(outcome[0] instanceof LockLostError);
    await Promise.all([first.close(), second.close()]);
  });

  test("renewed locks keep a job that runs longer than its lock", async () => {
    const queue = new Queue(fresh("renew"), { connection: client });
    const { id } = await queue.add("long", {});
    const worker = new Worker(queue.name, async () => {
      await new Promise((r) => setTimeout(r, 1500));
      return "kept";
    }, { connection: client, lockDuration: 400, lockRenewTime: 100 });
    let lost = false;
    worker.on("lockLost", () => (lost = true));
    const [job, result] = await once(worker, "completed");
    assert.equal(job.id, id);
    assert.equal(result, "kept");
    assert.equal(lost, false);
    const final = await queue.getJob(id);
    assert.equal(final.stalledCounter, 0);
    assert.equal(final.attemptsStarted, 1);
    await worker.close();
  });

  test("getFailed and getDeadLetters list final failures and retryJobs puts them back", async () => {
    const queue = new Queue(fresh("dlq"), { connection: client });
    const jobs = await queue.addBulk([0, 1, 2].map((i) => ({ name: "f", data: { i } })));
    let fail = true;
    const worker = new Worker(queue.name, async (job) => { if (fail) throw new Error(`bad ${job.data.i}`); return "ok"; }, { connection: client });
    await poll(async () => (await queue.getFailedCount()) === 3, "3 final failures");
    const dead = await queue.getDeadLetters();
    assert.deepEqual(dead.map((j) => j.id), jobs.map((j) => j.id));
    assert.deepEqual(dead.map((j) => [j.failedReason, j.dlqReason, j.attemptsMade]),
      [0, 1, 2].map((i) => [`bad ${i}`, "attempts exhausted", 1]));
    // The worker sent each error's stack with FAIL: one trace per failed attempt.
    assert.deepEqual(dead.map((j) => j.stacktrace.length), [1, 1, 1]);
    assert.ok(dead.every((j, i) => j.stacktrace[0].startsWith(`Error: bad ${i}\n    at `)), dead[0].stacktrace[0]);
    assert.deepEqual((await queue.getDeadLetters(1, 1)).map((j) => j.id), [jobs[1].id]);
    // BullMQ's getFailed: newest failure first.
    const failed = await queue.getFailed();
    assert.deepEqual(failed.map((j) => j.finishedOn), [...failed.map((j) => j.finishedOn)].sort((a, b) => b - a));
    assert.deepEqual(failed.map((j) => j.id).sort(), jobs.map((j) => j.id).sort());
    assert.equal(failed[0].state, "failed");
    fail = false;
    assert.equal(await queue.retryJobs({ state: "failed" }), 3);
    await poll(async () => (await queue.getCompletedCount()) === 3, "3 completions after the retry");
    assert.deepEqual(await queue.getFailed(), []);
    assert.deepEqual(await queue.getDeadLetters(), []);
    await assert.rejects(queue.retryJobs({ state: "active" }), BadRequestError);
    await worker.close();
  });

  test("upsertJobScheduler, getJobSchedulers, removeJobScheduler", async () => {
    const queue = new Queue(fresh("sched"), { connection: client });
    const s = await queue.upsertJobScheduler("tick", { every: 60_000 }, { name: "digest", data: { k: 1 } });
    assert.equal(s.id, "tick");
    assert.equal(s.every_ms, 60_000);
    assert.ok(s.next_tick_ms % 60_000 === 0 && s.next_tick_ms > Date.now());
    assert.deepEqual((await queue.getJobSchedulers()).map((x) => [x.id, x.name, x.data]), [["tick", "digest", { k: 1 }]]);
    assert.equal(await queue.removeJobScheduler("tick"), true);
    assert.equal(await queue.removeJobScheduler("tick"), false);
  });

  test("FlowProducer: the parent runs after its children and reads their values", async () => {
    const flow = new FlowProducer({ connection: client });
    const parentQ = fresh("report");
    const childQ = fresh("pages");
    const tree = await flow.add({
      name: "merge", queueName: parentQ, data: {},
      children: [1, 2, 3].map((p) => ({ name: "render", queueName: childQ, data: { p } })),
    });
    assert.equal(tree.children.length, 3);
    const childWorker = new Worker(childQ, async (job) => job.data.p * 10, { connection: client, concurrency: 3 });
    const parentWorker = new Worker(parentQ, async (job) => {
      const values = await job.getChildrenValues();
      return Object.values(values).reduce((a, b) => a + b, 0);
    }, { connection: client });
    const [job, result] = await once(parentWorker, "completed");
    assert.equal(job.id, tree.job.id);
    assert.equal(result, 60);
    await Promise.all([childWorker.close(), parentWorker.close()]);
  });

  test("QueueEvents: added, active, completed and failed", async () => {
    const name = fresh("events");
    const events = new QueueEvents(name, { connection: client });
    await events.waitUntilReady();
    const queue = new Queue(name, { connection: client });
    const seen = [];
    for (const t of ["added", "active", "completed", "failed"]) events.on(t, (e) => seen.push([t, e.jobId]));
    const completed = once(events, "completed");
    const ok = await queue.add("ok", { x: 1 });
    const bad = await queue.add("bad", { x: 2 });
    const worker = new Worker(name, async (job) => { if (job.name === "bad") throw new Error("nope"); return { ok: true }; }, { connection: client });
    const [e] = await completed;
    assert.equal(e.jobId, ok.id);
    assert.deepEqual(e.returnvalue, { ok: true });
    await poll(() => seen.some(([t, id]) => t === "failed" && id === bad.id), "the failed event");
    assert.ok(seen.some(([t, id]) => t === "added" && id === ok.id));
    assert.ok(seen.some(([t, id]) => t === "active" && id === ok.id));
    await worker.close();
    await events.close();
  });
});

describe("broker with a token", () => {
  const sb = new Sandbox();
  let addr;
  before(async () => { addr = (await sb.broker("bt", "--token", "s3cret")).addr; });
  after(() => sb.cleanup());

  test("a wrong token raises AuthError; the right one works", async () => {
    const bad = new Queue("q", { connection: { brokers: addr, token: "wrong" } });
    await assert.rejects(bad.add("x", {}), AuthError);
    await bad.close();
    const good = new Queue("q", { connection: { brokers: [addr], token: "s3cret" } });
    await good.add("x", {});
    assert.equal(await good.count(), 1);
    await good.close();
  });
});

describe("kill -9 of a broker", () => {
  const sb = new Sandbox();
  after(() => sb.cleanup());

  test("every answered add survives and the client carries on after the restart", async () => {
    let broker = await sb.broker("bk");
    const client = new ShardqClient({ brokers: broker.addr, retry: { unavailableBudgetMs: 1000 } });
    const queue = new Queue("durable", { connection: client });
    const answered = [];
    let stop = false;
    const producers = Array.from({ length: 4 }, async () => {
      while (!stop) {
        try {
          const jobs = await queue.addBulk(Array.from({ length: 50 }, (_, i) => ({ name: "d", data: { i } })));
          answered.push(...jobs.map((j) => j.id));
        } catch {
          return; // the broker died under this frame: its outcome is unknown, not counted
        }
      }
    });
    await poll(() => answered.length >= 2000, "2000 answered adds");
    const proc = sb.procs.find((p) => p.addr === broker.addr);
    await proc.kill();
    stop = true;
    await Promise.all(producers);
    broker = await sb.broker("bk");
    // A new port: the client learns it from the seed list it is given again.
    const after = new Queue("durable", { connection: broker.addr });
    const counts = await after.getJobCounts("waiting");
    assert.ok(counts.waiting >= answered.length, `${counts.waiting} jobs stored, ${answered.length} answered`);
    for (const id of answered.filter((_, i) => i % 97 === 0)) assert.ok(await after.getJob(id), `answered job ${id} lost`);
    await after.close();
    await client.close();
  });
});

describe("limits", () => {
  const sb = new Sandbox();
  let client;
  before(async () => { client = new ShardqClient((await sb.broker("bl")).addr); });
  after(async () => { await client?.close(); await sb.cleanup(); });

  test("big payloads are split into frames under the limit; one over it is refused, typed", async () => {
    const queue = new Queue("big", { connection: client });
    const blob = "x".repeat(200_000);
    const jobs = await queue.addBulk(Array.from({ length: 120 }, (_, i) => ({ name: "b", data: { i, blob } })));
    assert.equal(jobs.length, 120);
    const singles = await Promise.all(Array.from({ length: 100 }, (_, i) => queue.add("s", { i, blob })));
    assert.equal(singles.length, 100);
    assert.equal(await queue.count(), 220);
    await assert.rejects(queue.add("huge", { blob: "y".repeat(2_000_000) }), { name: "TooLargeError" });
    await assert.rejects(queue.add("fn", { f: () => 1 }), BadRequestError);
  });

  test("close() called from a processor does not wait for itself", async () => {
    const queue = new Queue("self-close", { connection: client });
    await queue.add("x", {});
    let worker;
    const closed = new Promise((r) => {
      worker = new Worker("self-close", async () => { await worker.close(); return "done"; }, { connection: client });
      worker.on("closed", r);
    });
    await closed;
    assert.equal(worker.completedCount, 1);
  });
});
