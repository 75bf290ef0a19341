// Job management (docs/protocol.md "Job management") on a 3-broker cluster:
// BullMQ's getters and actions on a partitioned queue (fan-out and merge over
// partitions on several brokers), and a Node job action on jobs a Python
// producer added.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { BadRequestError, JobStateError, NotFoundError, Queue, ShardqClient, Worker } from "../dist/index.js";
import { Sandbox, poll, runPython } from "./helpers.mjs";

// Explicit add times (the waiting order), just past, so a delay counts from now either way.
const T0 = Date.now() - 1000;
const ids = (jobs) => jobs.map((j) => j.id);

describe("job management on a 3-broker cluster", () => {
  const sb = new Sandbox();
  let cl;
  let client;
  let n = 0;
  const fresh = (p) => `${p}-${process.pid}-${++n}`;
  before(async () => {
    cl = await sb.cluster(3);
    client = new ShardqClient({ url: cl.url });
    await client.ready();
  });
  after(async () => {
    await client?.close();
    await sb.cleanup();
  });

  test("getters merge a partitioned queue's partitions in one order, pages included", async () => {
    const name = fresh("pjobs");
    await client.declareQueue(name, 6);
    const queue = new Queue(name, { connection: client });
    const owners = new Set(queue.partitions().map((p) => client.topology.route(p)[0]));
    assert.ok(owners.size >= 2, `partitions on ${[...owners]}`); // the fan-out crosses brokers
    const w = [0, 1, 2, 3, 4].map((i) => ({ name: "w", data: { i }, opts: { jobId: `w-${i}`, timestamp: T0 + i } }));
    const p = [0, 1, 2].map((i) => ({ name: "p", data: { i }, opts: { jobId: `p-${i}`, priority: 1 + i, timestamp: T0 + 10 + i } }));
    const d = [0, 1, 2].map((i) => ({ name: "d", data: { i }, opts: { jobId: `d-${i}`, delay: 600_000 + i * 1000, timestamp: T0 + 20 + i } }));
    await queue.addBulk([...w, ...p, ...d]);
    assert.ok(new Set((await queue.getJobs()).map((j) => j.partition)).size >= 2);

    assert.deepEqual(await queue.getJobCounts(), {
      waiting: 5, active: 0, completed: 0, failed: 0, delayed: 3, paused: 0, prioritized: 3,
      "waiting-children": 0, completed_total: 0, failed_total: 0,
    });
    assert.deepEqual(ids(await queue.getWaiting()), ["w-0", "w-1", "w-2", "w-3", "w-4"]);
    assert.deepEqual(ids(await queue.getPrioritized()), ["p-0", "p-1", "p-2"]);
    assert.deepEqual(ids(await queue.getDelayed()), ["d-0", "d-1", "d-2"]);
    // Ranks follow the types as listed; within one, newest first unless asc.
    const all = ids(await queue.getJobs(["delayed", "waiting"]));
    assert.deepEqual(all, ["d-2", "d-1", "d-0", "w-4", "w-3", "w-2", "w-1", "w-0"]);
    assert.deepEqual(ids(await queue.getJobs(["delayed", "waiting"], 2, 5)), all.slice(2, 6));
    assert.deepEqual(ids(await queue.getJobs("wait", 0, 1, true)), ["w-0", "w-1"]);
    const one = (await queue.getJobs(["prioritized"], 0, 0, true))[0];
    assert.deepEqual([one.name, one.data, one.opts.priority, one.queueName], ["p", { i: 0 }, 1, name]);
    await assert.rejects(queue.getJobs(["nope"]), BadRequestError);

    // Single-job actions: from a job read back (its partition known) and by id (fan-out).
    const d0 = await queue.getJob("d-0");
    await d0.promote();
    await assert.rejects(d0.promote(), JobStateError);
    await (await queue.getJob("w-0")).changePriority({ priority: 7 });
    await (await queue.getJob("w-1")).changeDelay(600_000);
    await (await queue.getJob("w-2")).updateData({ i: 2, updated: true });
    const w3 = await queue.getJob("w-3");
    assert.equal(await queue.remove("w-3"), 1);
    await assert.rejects(w3.promote(), NotFoundError);
    assert.equal(await queue.remove("w-3"), 0);
    assert.deepEqual((await queue.getJob("w-2")).data, { i: 2, updated: true });
    assert.equal(await queue.getJob("w-3"), undefined);
    const retry = await queue.getJob("w-4");
    await assert.rejects(retry.retry(), (err) => err instanceof JobStateError && err.jobId === "w-4" && err.state === "waiting");
    assert.deepEqual(await queue.getJobCounts("waiting", "prioritized", "delayed"), { waiting: 3, prioritized: 4, delayed: 3 });
    assert.deepEqual(ids(await queue.getWaiting()), ["w-2", "w-4", "d-0"]);
    assert.deepEqual(ids(await queue.getPrioritized()), ["w-0", "p-0", "p-1", "p-2"]); // by add time, not priority

    assert.equal(await queue.promoteJobs({ count: 1 }), 3); // count: jobs per request, all are promoted
    assert.deepEqual(await queue.getJobCounts("delayed"), { delayed: 0 });
    assert.equal(await queue.clean(0, 2, "prioritized"), 2);
    assert.equal(await queue.clean(0, 0, "prioritized"), 2);
    assert.deepEqual(await queue.getJobCounts("waiting", "prioritized"), { waiting: 6, prioritized: 0 });
  });

  test("retryJobs, clean, setRetention and discard over the partitions, totals kept", async () => {
    const name = fresh("pdone");
    await client.declareQueue(name, 4);
    const queue = new Queue(name, { connection: client });
    await queue.addBulk(Array.from({ length: 12 }, (_, i) => ({ name: "j", data: { i }, opts: { jobId: `j-${i}`, attempts: 3 } })));
    let failOdd = true;
    const worker = new Worker(name, async (job) => {
      if (job.data.i % 2 === 1 && failOdd) {
        await job.discard(); // this attempt is its last, whatever `attempts` says
        throw new Error(`odd ${job.data.i}`);
      }
      return job.data.i * 10;
    }, { connection: client, concurrency: 4 });
    await poll(async () => (await queue.getJobCountByTypes("completed", "failed")) === 12, "12 finished jobs");
    const failed = await queue.getFailed();
    assert.deepEqual(failed.map((j) => [j.attemptsMade, j.failedReason]).sort(),
      [1, 3, 5, 7, 9, 11].map((i) => [1, `odd ${i}`]).sort());
    assert.equal((await queue.getCompleted(0, 2)).length, 3);
    assert.equal(await queue.getCompletedCount(), 6);

    failOdd = false;
    assert.equal(await queue.retryJobs({ state: "failed", count: 2 }), 6);
    await poll(async () => (await queue.getCompletedCount()) === 12, "12 completions after the retry");
    const c = await queue.getJobCounts("completed", "failed", "completed_total", "failed_total");
    assert.deepEqual(c, { completed: 12, failed: 0, completed_total: 12, failed_total: 6 });
    await assert.rejects(queue.retryJobs({ state: "active" }), BadRequestError);

    const kept = await queue.setRetention({ keepCompleted: 1 });
    assert.equal(kept.keepCompleted, 1);
    assert.ok(kept.removed >= 12 - 4, `removed ${kept.removed}`); // at most one kept per partition
    const left = await queue.getCompletedCount();
    assert.equal(left, 12 - kept.removed);
    assert.equal(await queue.clean(0, 0, "completed"), left);
    assert.deepEqual(await queue.getJobCounts("completed", "completed_total"), { completed: 0, completed_total: 12 });
    await worker.close();
  });

  test("a trace given at add reaches the worker as job.trace (PULL's field 10)", async () => {
    const name = fresh("trace");
    const queue = new Queue(name, { connection: client });
    const trace = { traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01" };
    await queue.add("t", { n: 1 }, { jobId: "traced", trace });
    await queue.add("u", { n: 2 }, { jobId: "plain" });
    const seen = new Map();
    const worker = new Worker(name, async (job) => { seen.set(job.id, [job.trace, job.timeoutMs]); }, { connection: client });
    await poll(async () => seen.size === 2, "both jobs run");
    assert.deepEqual(seen.get("traced"), [trace, 0]);
    assert.deepEqual(seen.get("plain"), [undefined, 0]);
    await worker.close();
  });

  test("a Node job action on jobs a Python producer added, read back by Python", async () => {
    const name = fresh("xjobs");
    const addr = client.topology.route(name)[1];
    const out = await runPython(`
import asyncio, json, os, shardq
async def main():
    async with await shardq.connect(os.environ["ADDR"]) as client:
        q = client.queue(os.environ["QUEUE"])
        await q.add("late", {"who": "py", "n": 2**40}, job_id="py-delayed", delay_ms=600000)
        await q.add("now", {"who": "py"}, job_id="py-waiting")
        await q.add("prio", {"who": "py"}, job_id="py-prio", priority=4)
        print(json.dumps(await q.get_job_counts("waiting", "prioritized", "delayed")))
asyncio.run(main())
`, { ADDR: addr, QUEUE: name });
    assert.deepEqual(JSON.parse(out.trim().split("\n").pop()), {
      waiting: 1, prioritized: 1, delayed: 1, completed_total: 0, failed_total: 0,
    });
    const queue = new Queue(name, { connection: client });
    const delayed = (await queue.getDelayed())[0];
    assert.deepEqual([delayed.id, delayed.name, delayed.data], ["py-delayed", "late", { who: "py", n: 2 ** 40 }]);
    await delayed.promote();
    await (await queue.getJob("py-waiting")).updateData({ who: "node", list: [1, null, "✓"] });
    await (await queue.getJob("py-prio")).changePriority({ priority: 0 });

    const check = await runPython(`
import asyncio, json, os, shardq
async def main():
    async with await shardq.connect(os.environ["ADDR"]) as client:
        q = client.queue(os.environ["QUEUE"])
        out = {}
        for jid in ("py-delayed", "py-waiting", "py-prio"):
            j = await q.get_job(jid)
            out[jid] = [j["state"], j["priority"], j["data"]]
        out["waiting"] = [j["id"] for j in await q.get_jobs(["waiting"], asc=True)]
        print(json.dumps(out))
asyncio.run(main())
`, { ADDR: addr, QUEUE: name });
    const seen = JSON.parse(check.trim().split("\n").pop());
    assert.deepEqual(seen["py-delayed"], ["waiting", 0, { who: "py", n: 2 ** 40 }]);
    assert.deepEqual(seen["py-waiting"], ["waiting", 0, { who: "node", list: [1, null, "✓"] }]);
    assert.deepEqual(seen["py-prio"], ["waiting", 0, { who: "py" }]);
    assert.deepEqual(seen.waiting.sort(), ["py-delayed", "py-prio", "py-waiting"]);
  });
});
