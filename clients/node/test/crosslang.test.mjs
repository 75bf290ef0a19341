// Job data written by one client is read by the other: a Python producer
// with a Node worker, and a Node producer with a Python worker, on one broker.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { Queue, ShardqClient, Worker } from "../dist/index.js";
import { Sandbox, poll, runPython } from "./helpers.mjs";

const PY_PRODUCER = `
import asyncio, json, os, shardq
async def main():
    async with await shardq.connect(os.environ["ADDR"]) as client:
        q = client.queue(os.environ["QUEUE"])
        ids = []
        for i in range(20):
            ids.append(await q.add("from-python", {"i": i, "s": "ünï ✓", "big": 2**62 + i, "ms": 1767225600000,
                                                   "neg": -(2**40), "f": 1.5, "l": [1, None, True], "b": b"\\x00\\xff",
                                                   "m": {"k": [i]}}, attempts=2))
        print(json.dumps(ids))
asyncio.run(main())
`;

const PY_CHECK = `
import asyncio, json, os, shardq
async def main():
    async with await shardq.connect(os.environ["ADDR"]) as client:
        q = client.queue(os.environ["QUEUE"])
        out = []
        for jid in json.loads(os.environ["IDS"]):
            job = await q.get_job(jid)
            r = dict(job["result"]); r["bin"] = r["bin"].hex(); r["big"] = str(r["big"])
            out.append({"state": job["state"], "result": r})
        print(json.dumps(out))
asyncio.run(main())
`;

const PY_WORKER = `
import asyncio, os, shardq
async def main():
    async with await shardq.connect(os.environ["ADDR"]) as client:
        want = int(os.environ["N"])
        done = asyncio.Event()
        seen = []
        async def handle(job):
            d = job.data
            seen.append(job.id)
            if len(seen) >= want:
                done.set()
            return {"py_saw": {"i": d["i"], "s": d["s"], "big": d["big"], "neg": d["neg"], "f": d["f"],
                               "b_hex": d["b"].hex(), "nested": d["m"]["deep"][0], "none": d["none"]},
                    "name": job.name, "queue": job.queue}
        worker = client.worker(os.environ["QUEUE"], handle, concurrency=4)
        task = asyncio.create_task(worker.run())
        await asyncio.wait_for(done.wait(), 30)
        await worker.close()
        await task
asyncio.run(main())
`;

describe("cross-language", () => {
  const sb = new Sandbox();
  let addr;
  let client;
  before(async () => {
    addr = (await sb.broker("bx")).addr;
    client = new ShardqClient(addr);
  });
  after(async () => { await client?.close(); await sb.cleanup(); });

  test("a Python producer's jobs are run by a Node worker, and Python reads the Node results", async () => {
    const ids = JSON.parse(await runPython(PY_PRODUCER, { ADDR: addr, QUEUE: "py-to-node" }));
    assert.equal(ids.length, 20);
    const seen = new Map();
    const worker = new Worker("py-to-node", async (job) => {
      seen.set(job.id, job.data);
      return { nodeSaw: job.data.i, big: job.data.big + 1n, from: "node", bin: Buffer.from([1, 2, 3]) };
    }, { connection: client, concurrency: 5 });
    await poll(() => seen.size === 20, "the Node worker to run 20 Python jobs");
    await worker.close();
    const d = seen.get(ids[3]);
    assert.equal(d.i, 3);
    assert.equal(d.s, "ünï ✓");
    assert.equal(d.big, 2n ** 62n + 3n);
    assert.equal(d.ms, 1767225600000);
    assert.equal(d.neg, -(2 ** 40));
    assert.equal(d.f, 1.5);
    assert.deepEqual(d.l, [1, null, true]);
    assert.deepEqual([...d.b], [0, 255]);
    assert.deepEqual(d.m, { k: [3] });
    const checked = JSON.parse(await runPython(PY_CHECK, { ADDR: addr, QUEUE: "py-to-node", IDS: JSON.stringify([ids[3]]) }));
    assert.equal(checked[0].state, "completed");
    assert.equal(checked[0].result.nodeSaw, 3);
    assert.equal(checked[0].result.from, "node");
    assert.equal(checked[0].result.big, String(2n ** 62n + 4n));
    assert.equal(checked[0].result.bin, "010203");
  });

  test("a Node producer's jobs are run by a Python worker, and Node reads the Python results", async () => {
    const queue = new Queue("node-to-py", { connection: client });
    const jobs = await queue.addBulk(Array.from({ length: 12 }, (_, i) => ({
      name: "from-node",
      data: { i, s: "ünï ✓", big: 2n ** 62n + BigInt(i), neg: -(2 ** 40), f: 1.5, b: Buffer.from([0, 255]), m: { deep: [i * 10] }, none: null },
    })));
    await runPython(PY_WORKER, { ADDR: addr, QUEUE: "node-to-py", N: "12" });
    const job = await queue.getJob(jobs[7].id);
    assert.equal(job.state, "completed");
    assert.deepEqual(job.returnvalue, {
      py_saw: { i: 7, s: "ünï ✓", big: 2n ** 62n + 7n, neg: -(2 ** 40), f: 1.5, b_hex: "00ff", nested: 70, none: null },
      name: "from-node", queue: "node-to-py",
    });
    assert.equal(await queue.getCompletedCount(), 12);
  });
});
