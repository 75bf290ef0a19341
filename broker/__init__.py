"""The broker process: memory-served queues, SQLite redo log, TCP protocol."""
