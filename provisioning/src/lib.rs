//! Redis-backed job queue and the LibreChat account provisioning workflow.
//!
//! The queue arrives with the provisioning issue; this crate exists now so the workspace
//! layout is stable.
