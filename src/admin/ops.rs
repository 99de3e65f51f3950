//! Operations shared by the admin API and the CLI: register users, look them up, import a CSV.

use std::io::Read;

use provisioning::{JobState, ProvisionRequest};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::Ops;
use crate::{
    credentials::vault::{CredentialStatus, EmailOwner, VaultError},
    provisioner::ProvisionError,
};

#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Session(#[from] crate::session::SessionError),
    #[error(transparent)]
    Vault(#[from] VaultError),
    #[error("queue: {0}")]
    Queue(#[from] provisioning::QueueError),
    #[error(transparent)]
    Provision(#[from] ProvisionError),
}

/// A user to register.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    pub user_id: String,
    pub email: String,
    #[serde(default)]
    pub name: Option<String>,
}

/// Longest user id or name ops may register (ids become Redis keys and log fields).
const MAX_FIELD_CHARS: usize = 256;

fn clean_text(field: &str, value: &str) -> Result<(), OpsError> {
    if value.chars().count() > MAX_FIELD_CHARS || value.chars().any(char::is_control) {
        return Err(OpsError::Invalid(format!(
            "`{field}` must be at most {MAX_FIELD_CHARS} characters without control characters"
        )));
    }
    Ok(())
}

impl NewUser {
    pub fn validate(&self) -> Result<(), OpsError> {
        if self.user_id.trim().is_empty() || self.user_id.contains(char::is_whitespace) {
            return Err(OpsError::Invalid(
                "`user_id` must be a non-empty id without spaces".into(),
            ));
        }
        clean_text("user_id", &self.user_id)?;
        if let Some(name) = &self.name {
            clean_text("name", name)?;
        }
        if !provisioning::is_valid_email(&self.email) {
            return Err(OpsError::Invalid(format!(
                "`email` {:?} is not an email address",
                self.email.chars().take(MAX_FIELD_CHARS).collect::<String>()
            )));
        }
        Ok(())
    }
}

/// Whether registering a user also lifts a deactivation: explicit registrations by ops and the
/// identity service's `user.created` do; an ordinary `user.updated` does not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reactivation {
    Lift,
    Keep,
}

/// Enqueues provisioning; returns the job id and whether it is new.
pub async fn add_user(
    state: &Ops,
    user: NewUser,
    source: &str,
    reactivation: Reactivation,
) -> Result<(String, bool), OpsError> {
    user.validate()?;
    let user_id = user.user_id.trim().to_owned();
    if reactivation == Reactivation::Lift && state.vault.reactivate(&user_id).await? {
        tracing::info!(user = %user_id, source, "deactivated user registered again");
    }
    Ok(state
        .provisioner
        .enqueue(ProvisionRequest {
            user_id,
            email: provisioning::normalize_email(&user.email),
            name: user.name.filter(|n| !n.trim().is_empty()),
            source: source.to_owned(),
        })
        .await?)
}

/// Deactivates a user everywhere, durably: the credential (or a tombstone, when provisioning has
/// not stored one yet) is marked disabled and no later provisioning step can undo that, the
/// user's pending or running job is withdrawn, every session ends, the LibreChat login is
/// signed out and every replica drops its in-process copy of it.
pub async fn deactivate(state: &Ops, user_id: &str, reason: &str) -> Result<Value, OpsError> {
    state.vault.disable(user_id, reason).await?;
    let cancelled = state
        .provisioner
        .queue
        .cancel_user(user_id, &format!("cancelled: {reason}"))
        .await?;
    let revoked = state.sessions.revoke_all(user_id).await?;
    if let Err(e) = state
        .tokens
        .sign_out(user_id, state.provisioner.caller())
        .await
    {
        tracing::warn!(user = %user_id, error = %e, "LibreChat sign-out of a deactivated user failed");
    }
    tracing::info!(user = %user_id, revoked, cancelled_job = ?cancelled, "user deactivated");
    Ok(json!({ "revoked": revoked, "cancelled_job": cancelled }))
}

/// Everything ops may know about a user; never the password. `None`: unknown user.
pub async fn user_status(state: &Ops, user_id: &str) -> Result<Option<Value>, OpsError> {
    let record = state.vault.get(user_id).await?;
    let job_id = state.provisioner.queue.active_job_of(user_id).await?;
    let job = match &job_id {
        Some(id) => state.provisioner.queue.job(id).await?,
        None => None,
    };
    if record.is_none() && job.is_none() {
        return Ok(None);
    }
    let state_name = match (&record, &job) {
        (Some(r), _) if r.status == CredentialStatus::Ready => "ready".to_owned(),
        (Some(r), _) if r.status == CredentialStatus::Disabled => "disabled".to_owned(),
        (_, Some(j)) => format!("{:?}", j.state).to_lowercase(),
        (Some(r), None) => serde_json::to_value(r.status)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default(),
        (None, None) => "unknown".to_owned(),
    };
    Ok(Some(json!({
        "user_id": user_id,
        "email": record.as_ref().map(|r| r.email.clone()).or_else(|| job.as_ref().map(|j| j.request.email.clone())),
        "state": state_name,
        "credential_status": record.as_ref().map(|r| r.status),
        "librechat_user_id": record.as_ref().and_then(|r| r.librechat_user_id.clone()),
        "attempts": job.as_ref().map_or(0, |j| j.attempts),
        "last_error": job.as_ref().and_then(|j| j.last_error.clone())
            .or_else(|| record.as_ref().and_then(|r| r.last_error.clone())),
        "job": job.map(|j| job_json(&j)),
    })))
}

pub fn job_json(j: &provisioning::Job) -> Value {
    json!({
        "id": j.id,
        "user_id": j.request.user_id,
        "email": j.request.email,
        "source": j.request.source,
        "state": j.state,
        "attempts": j.attempts,
        "last_error": j.last_error,
        "created_at": j.created_at,
        "updated_at": j.updated_at,
        "next_run_at": j.next_run_at,
    })
}

pub fn parse_state(s: &str) -> Result<JobState, OpsError> {
    match s {
        "dead" => Ok(JobState::Dead),
        "pending" => Ok(JobState::Pending),
        "delayed" => Ok(JobState::Delayed),
        "running" => Ok(JobState::Running),
        "done" => Ok(JobState::Done),
        other => Err(OpsError::Invalid(format!(
            "state {other:?} is not one of dead, pending, delayed, running, done"
        ))),
    }
}

#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct ImportReport {
    /// Rows with a migrated password: stored as ready, LibreChat untouched.
    pub migrated: usize,
    /// Rows queued for provisioning.
    pub enqueued: usize,
    /// Rows whose user already had an active job.
    pub already_queued: usize,
    /// Rows refused, with the line number and why.
    pub rejected: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct CsvRow {
    user_id: String,
    email: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    librechat_password_encrypted: Option<String>,
}

/// Imports users from CSV (`user_id,email[,name][,librechat_password_encrypted]`, header row
/// required). A `librechat_password_encrypted` value is the old Django system's Fernet token
/// under the same key ring: such users are stored as ready without touching LibreChat.
pub async fn import_csv(state: &Ops, input: impl Read) -> Result<ImportReport, OpsError> {
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(input);
    let mut report = ImportReport::default();
    for (i, row) in reader.deserialize::<CsvRow>().enumerate() {
        let line = i + 2;
        let row = match row {
            Ok(r) => r,
            Err(e) => {
                report.rejected.push(format!("line {line}: {e}"));
                continue;
            }
        };
        let user = NewUser {
            user_id: row.user_id,
            email: row.email,
            name: row.name,
        };
        if let Err(e) = user.validate() {
            report.rejected.push(format!("line {line}: {e}"));
            continue;
        }
        let user_id = user.user_id.trim().to_owned();
        let email = provisioning::normalize_email(&user.email);
        match row.librechat_password_encrypted.filter(|p| !p.is_empty()) {
            Some(token) => {
                // Decrypt to prove the ring can read it, then keep the token as is.
                if state.keyring.decrypt(&token).is_err() {
                    report.rejected.push(format!(
                        "line {line}: librechat_password_encrypted does not decrypt with crypto.fernet_keys"
                    ));
                    continue;
                }
                if let EmailOwner::Other(owner) = state.vault.bind_email(&email, &user_id).await? {
                    report.rejected.push(format!(
                        "line {line}: the email is already bound to identity user {owner}"
                    ));
                    continue;
                }
                let now = state.clock.now().unix_timestamp();
                let record = crate::credentials::vault::CredentialRecord {
                    user_id: user_id.clone(),
                    email,
                    name: user.name.clone(),
                    librechat_user_id: None,
                    password: token,
                    status: CredentialStatus::Ready,
                    created_at: now,
                    updated_at: now,
                    last_error: None,
                };
                if !state.vault.create(&record).await? {
                    report.rejected.push(format!(
                        "line {line}: user {user_id} already has a credential; left as is"
                    ));
                    continue;
                }
                report.migrated += 1;
            }
            None => {
                let added = add_user(state, user, "import", Reactivation::Lift).await;
                let (_, created) = match added {
                    Err(OpsError::Provision(e @ ProvisionError::EmailTaken { .. })) => {
                        report.rejected.push(format!("line {line}: {e}"));
                        continue;
                    }
                    other => other?,
                };
                if created {
                    report.enqueued += 1;
                } else {
                    report.already_queued += 1;
                }
            }
        }
    }
    Ok(report)
}
