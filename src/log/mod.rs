//! The ingest log.
//!
//! Today every decoded batch gets a sequence number from the engine; that
//! number is what filter-view rows are keyed by. The durable, replayable log
//! in fjall (group commit, acknowledgements after the append) is the next
//! step of the roadmap and will live here; the engine already acknowledges
//! nothing before decode, so the append slots in between.
