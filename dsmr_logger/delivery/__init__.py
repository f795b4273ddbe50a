"""Getting telegrams there: per-sink ordered queues, the durable spool, answers, and sinks."""
