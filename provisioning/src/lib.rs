//! Redis-backed job queue and the LibreChat account provisioning workflow.
//!
//! The queue ([`queue`]) is generic at-least-once machinery on Redis Streams; workers
//! ([`worker`]) run jobs; the workflow ([`workflow`]) decides what to do for one user and talks
//! to LibreChat and the credential vault through [`workflow::AccountBackend`], which the service
//! implements.

pub mod conn;
pub mod queue;
mod scripts;
pub mod worker;
pub mod workflow;

pub use conn::RedisConn;
pub use queue::{Delivery, Job, JobQueue, JobState, ProvisionRequest, QueueConfig, QueueError};
pub use worker::{JobHandler, Outcome, Worker};
pub use workflow::{
    is_valid_email, normalize_email, AccountBackend, LibreChatFailure, ProvisionWorkflow,
    StoredCredential,
};
