//! Webhook delivery of registry events.
//!
//! The registry writes events to the durable outbox in the metadata store
//! (`registry::events`). Here, one task per configured endpoint reads the
//! outbox from that endpoint's cursor, in order, skips what its filter does
//! not want, and POSTs each event as a CloudEvent (structured mode). A
//! failed delivery is retried with exponential backoff; after the last
//! attempt the event becomes a dead letter and delivery moves on. The cursor
//! moves only after an event is done with, so after a restart delivery
//! resumes where it stopped: at-least-once, in order, per endpoint. A pruner
//! drops events every endpoint is done with.

mod deliver;
mod endpoint;

pub use deliver::start;
pub use endpoint::{glob_match, validate_all, wanted_kinds, Endpoint, EndpointConfig};
