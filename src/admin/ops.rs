//! Operations shared by the admin API and the CLI: register users, look them up, import a CSV.

use std::io::Read;

use provisioning::{JobState, ProvisionRequest};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::{
    app::AppState,
    credentials::vault::{CredentialStatus, VaultError},
    provision::ProvisionError,
};

#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("{0}")]
    Invalid(String),
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

impl NewUser {
    pub fn validate(&self) -> Result<(), OpsError> {
        if self.user_id.trim().is_empty() || self.user_id.contains(char::is_whitespace) {
            return Err(OpsError::Invalid(
                "`user_id` must be a non-empty id without spaces".into(),
            ));
        }
        let email = self.email.trim();
        let valid = email
            .split_once('@')
            .is_some_and(|(l, d)| !l.is_empty() && d.contains('.') && !d.starts_with('.'));
        if !valid {
            return Err(OpsError::Invalid(format!(
                "`email` {:?} is not an email address",
                self.email
            )));
        }
        Ok(())
    }
}

/// Enqueues provisioning; returns the job id and whether it is new.
pub async fn add_user(
    state: &AppState,
    user: NewUser,
    source: &str,
) -> Result<(String, bool), OpsError> {
    user.validate()?;
    Ok(state
        .provisioner
        .enqueue(ProvisionRequest {
            user_id: user.user_id.trim().to_owned(),
            email: user.email.trim().to_lowercase(),
            name: user.name.filter(|n| !n.trim().is_empty()),
            source: source.to_owned(),
        })
        .await?)
}

/// Everything ops may know about a user; never the password. `None`: unknown user.
pub async fn user_status(state: &AppState, user_id: &str) -> Result<Option<Value>, OpsError> {
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
pub async fn import_csv(state: &AppState, input: impl Read) -> Result<ImportReport, OpsError> {
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
        match row.librechat_password_encrypted.filter(|p| !p.is_empty()) {
            Some(token) => {
                // Decrypt to prove the ring can read it, then keep the token as is.
                if state.keyring.decrypt(&token).is_err() {
                    report.rejected.push(format!(
                        "line {line}: librechat_password_encrypted does not decrypt with crypto.fernet_keys"
                    ));
                    continue;
                }
                let now = state.clock.now().unix_timestamp();
                let record = crate::credentials::vault::CredentialRecord {
                    user_id: user.user_id.trim().to_owned(),
                    email: user.email.trim().to_lowercase(),
                    name: user.name.clone(),
                    librechat_user_id: None,
                    password: token,
                    status: CredentialStatus::Ready,
                    created_at: now,
                    updated_at: now,
                    last_error: None,
                };
                state.vault.put(&record).await?;
                report.migrated += 1;
            }
            None => {
                let (_, created) = add_user(state, user, "import").await?;
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
