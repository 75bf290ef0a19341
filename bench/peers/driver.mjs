// One workload against one peer, the same workloads as bench/drivers/shardq_driver.py.
//
//   node driver.mjs '{"peer":"bullmq","workload":"add_bulk",...}'     (BullMQ on Node, Redis)
//   bun  driver.mjs '{"peer":"bunqueue","workload":"e2e",...}'        (bunqueue client on Bun)
//   node driver.mjs '{"peer":"shardq","target":"http://...",...}'     (shardq's Node client, clients/node)
//
// Prints one JSON line: {"ops", "seconds", "rate", "p50_ms", "p99_ms"}. Every workload stops at
// `jobs` or after `seconds`, whichever comes first. BullMQ is configured as its "going to
// production" guide says (removeOnComplete/removeOnFail counts, maxRetriesPerRequest: null for
// workers); bunqueue with its TCP client defaults (pooled, pipelined) and the worker batch
// pulling + long polling its worker guide recommends for high-volume queues. Both clients
// speak the same BullMQ-style API, so one driver serves both.

const cfg = JSON.parse(process.argv[2]);
const isBull = cfg.peer === 'bullmq';
const isShardq = cfg.peer === 'shardq';
const mod = isShardq ? await import(new URL('../../clients/node/dist/index.js', import.meta.url))
  : isBull ? await import('bullmq') : await import('bunqueue/client');
const { Queue, Worker } = mod;

// shardq: one client (its connections, add batcher) shared by the queues and workers, as a
// service would; BullMQ and bunqueue open their own per Queue/Worker.
const connection = isShardq ? new mod.ShardqClient(cfg.target) : { host: cfg.host, port: cfg.port };
const payload = { body: 'x'.repeat(cfg.payload) };
const queueNames = Array.from({ length: cfg.queues }, (_, i) => `${cfg.prefix}-${i}`);
// Worker tuning from each project's docs: BullMQ's production guide (retention by count);
// bunqueue's "Worker concurrency and batch pulling" guide (batchSize 100, long-poll 5 s).
const workerOpts = isBull
  ? { removeOnComplete: { count: 1000 }, removeOnFail: { count: 5000 } }
  : isShardq ? {} : { batchSize: 100, pollTimeout: 5000 };
const queues = queueNames.map((n) => new Queue(n, { connection }));

const now = () => performance.now();
const lat = [];
let ops = 0;
const t0 = now();
const deadline = t0 + cfg.seconds * 1000;
const more = () => ops < cfg.jobs && now() < deadline;

function pct(xs, p) {
  if (!xs.length) return null;
  xs.sort((a, b) => a - b);
  return xs[Math.min(xs.length - 1, Math.floor(xs.length * p))];
}

async function addSingle(inflight) {
  let next = 0;
  async function lane() {
    while (more()) {
      const q = queues[next++ % queues.length];
      ops++;
      const t = now();
      await q.add('j', payload);
      lat.push(now() - t);
    }
  }
  await Promise.all(Array.from({ length: inflight }, lane));
}

async function addBulk() {
  let next = 0;
  async function lane() {
    while (more()) {
      const k = Math.min(cfg.bulk, cfg.jobs - ops);
      ops += k;
      const q = queues[next++ % queues.length];
      const t = now();
      await q.addBulk(Array.from({ length: k }, () => ({ name: 'j', data: payload })));
      lat.push(now() - t);
    }
  }
  await Promise.all(Array.from({ length: cfg.bulk_inflight }, lane));
}

async function endToEnd() {
  // Producers push with addBulk while workers (concurrency split over the queues) complete.
  let done = 0;
  let resolve;
  const finished = new Promise((r) => { resolve = r; });
  const per = Math.max(1, Math.ceil(cfg.concurrency / queues.length));
  const workers = queueNames.map((n) => new Worker(n, async () => {
    done++;
    if (done >= cfg.jobs) resolve();
    return null;
  }, { connection: isBull ? { ...connection, maxRetriesPerRequest: null } : connection,
       concurrency: per, ...workerOpts }));
  const timer = setTimeout(resolve, cfg.seconds * 1000);
  const producer = addBulk();
  await finished;
  clearTimeout(timer);
  const seconds = (now() - t0) / 1000;
  const completed = Math.min(done, cfg.jobs);
  await producer.catch(() => {});
  ops = completed;
  await Promise.all(workers.map((w) => w.close()));
  return seconds;
}

let seconds;
if (cfg.workload === 'add_single') await addSingle(1);
else if (cfg.workload === 'add_concurrent') await addSingle(cfg.concurrency);
else if (cfg.workload === 'add_bulk') await addBulk();
else if (cfg.workload === 'e2e') seconds = await endToEnd();
else throw new Error(`unknown workload ${cfg.workload}`);
seconds ??= (now() - t0) / 1000;
const out = { ops, seconds, rate: ops / seconds, p50_ms: pct(lat, 0.5), p99_ms: pct(lat, 0.99) };
await Promise.all(queues.map((q) => q.close()));
if (isShardq) await connection.close();
process.stdout.write(JSON.stringify(out) + '\n');
process.exit(0);
