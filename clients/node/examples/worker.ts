// The README's worker (type-checked by `npm test`; see README "Migrating from BullMQ").
import { Job, LockLostError, Worker } from "shardq";

const connection = { url: process.env.SHARDQ_COORDINATOR ?? "http://127.0.0.1:7070", token: process.env.SHARDQ_TOKEN };

export function work(): Worker<{ to: string }, { sent: boolean }> {
  const worker = new Worker<{ to: string }, { sent: boolean }>("emails", async (job: Job<{ to: string }, { sent: boolean }>) => {
    await job.updateProgress(50);
    await job.log(`sending to ${job.data.to}`);
    return { sent: true };
  }, { connection, concurrency: 50, lockDuration: 30_000 });
  worker.on("completed", (job: Job, result: { sent: boolean }) => console.log(job.id, result));
  worker.on("failed", (job: Job | undefined, err: Error) => console.error(job?.id, err.message));
  worker.on("lockLost", (job: Job) => console.warn(`${job.id}: lock lost, result dropped`));
  worker.on("error", (err: Error) => { if (!(err instanceof LockLostError)) console.error(err); });
  process.once("SIGTERM", () => void worker.close());
  return worker;
}
