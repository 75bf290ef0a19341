// The README's producer (type-checked by `npm test`; see README "Migrating from BullMQ").
import { FlowProducer, Queue, QueueEvents } from "shardq";

// BullMQ: const connection = { host: "127.0.0.1", port: 6379 };
const connection = { url: process.env.SHARDQ_COORDINATOR ?? "http://127.0.0.1:7070", token: process.env.SHARDQ_TOKEN };

export async function produce(): Promise<void> {
  const queue = new Queue<{ to: string }, { sent: boolean }>("emails", { connection });
  const job = await queue.add("send", { to: "a@b" }, {
    attempts: 3,
    backoff: { type: "exponential", delay: 1000 },
    removeOnComplete: 1000,
    removeOnFail: 5000,
  });
  await queue.addBulk([
    { name: "send", data: { to: "c@d" }, opts: { priority: 1 } },
    { name: "send", data: { to: "e@f" }, opts: { delay: 60_000, jobId: "welcome-e@f" } },
  ]);
  const counts: Record<string, number> = await queue.getJobCounts("waiting", "active", "completed", "failed");
  const again = await queue.getJob(job.id);
  console.log(counts, again?.state, again?.returnvalue?.sent);
  await queue.upsertJobScheduler("daily-digest", { pattern: "0 9 * * *", tz: "Europe/Paris" }, { name: "digest", data: { to: "all" } });

  const events = new QueueEvents("emails", { connection });
  events.on("completed", ({ jobId, returnvalue }: { jobId: string; returnvalue: unknown }) => console.log(jobId, returnvalue));

  const flow = new FlowProducer({ connection });
  await flow.add({ name: "report", queueName: "reports", data: {}, children: [{ name: "page", queueName: "pages", data: { p: 1 } }] });

  await Promise.all([queue.close(), events.close(), flow.close()]);
}
