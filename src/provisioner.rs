//! The service's side of provisioning: the job queue wired to the credential vault and the
//! LibreChat client (the workflow itself lives in the `provisioning` crate), and the
//! just-in-time trigger used by sign-in and the proxy.

use std::{net::IpAddr, sync::Arc, time::Duration};

use async_trait::async_trait;
use axum::http::HeaderValue;
use provisioning::{
    normalize_email, workflow::BackendError, AccountBackend, Job, JobHandler, JobQueue, JobState,
    LibreChatFailure, Outcome, ProvisionRequest, ProvisionWorkflow, QueueConfig, QueueError,
    StoredCredential, Worker,
};
use tokio::sync::watch;

use crate::{
    config::Config,
    credentials::vault::{
        CredentialStatus, CredentialVault, EmailOwner, Password, Refusal, Updated, VaultError,
    },
    end_user::ClientInfo,
    identity::UserInfo,
    librechat::{
        service_account::{ServiceAccount, SERVICE_OWNER},
        LibreChatClient, LibreChatError,
    },
    redis_conn::RedisHandle,
    telemetry::metrics::{Metrics, OutcomeLabels},
};

/// The vault and LibreChat, as the workflow sees them.
pub struct VaultAccounts {
    vault: CredentialVault,
    client: LibreChatClient,
    caller: ClientInfo,
    service: Arc<ServiceAccount>,
}

impl From<VaultError> for BackendError {
    fn from(e: VaultError) -> Self {
        BackendError(e.to_string())
    }
}

fn failure(e: LibreChatError) -> LibreChatFailure {
    match e {
        LibreChatError::RateLimited { retry_after } => LibreChatFailure::RateLimited(retry_after),
        LibreChatError::BadCredentials => LibreChatFailure::BadCredentials,
        LibreChatError::Rejected {
            status: 403,
            message,
        } if message.contains("not allowed") => LibreChatFailure::Disabled(message),
        LibreChatError::Rejected { message, .. } => LibreChatFailure::Invalid(message),
        LibreChatError::TwoFactorRequired => {
            LibreChatFailure::Invalid("the account has two-factor authentication on".into())
        }
        other => LibreChatFailure::Unavailable(other.to_string()),
    }
}

#[async_trait]
impl AccountBackend for VaultAccounts {
    async fn credential(&self, user_id: &str) -> Result<StoredCredential, BackendError> {
        let Some(record) = self.vault.get(user_id).await? else {
            return Ok(StoredCredential::None);
        };
        match record.status {
            CredentialStatus::Ready => return Ok(StoredCredential::Ready),
            CredentialStatus::Disabled => return Ok(StoredCredential::Disabled),
            // A conflict recorded before any password was stored: nothing to confirm yet.
            _ if record.password.is_empty() => return Ok(StoredCredential::None),
            _ => {}
        }
        let password = self.vault.password(&record)?.expose().to_owned();
        Ok(StoredCredential::Unconfirmed {
            password,
            email: provisioning::normalize_email(&record.email),
            drifted: matches!(
                record.status,
                CredentialStatus::Drifted | CredentialStatus::Conflict
            ),
        })
    }

    async fn store_password(
        &self,
        request: &ProvisionRequest,
        password: &str,
    ) -> Result<bool, BackendError> {
        let record = self.vault.new_record(
            &request.user_id,
            &request.email,
            request.name.as_deref(),
            &Password::new(password),
            CredentialStatus::Provisioning,
        );
        if self.vault.create(&record).await? {
            return Ok(true);
        }
        // A passwordless conflict marker may stand there: replace it, never a deactivation.
        let updated = self
            .vault
            .update(&request.user_id, |r| {
                if r.status != CredentialStatus::Conflict || !r.password.is_empty() {
                    return Err(Refusal::Disabled);
                }
                r.password = record.password.clone();
                r.email = record.email.clone();
                r.status = CredentialStatus::Provisioning;
                r.last_error = None;
                Ok(())
            })
            .await?;
        Ok(matches!(updated, Updated::Done(_)))
    }

    async fn mark_ready(
        &self,
        user_id: &str,
        librechat_user_id: Option<&str>,
    ) -> Result<bool, BackendError> {
        let updated = self
            .vault
            .update(user_id, |r| {
                if r.status == CredentialStatus::Disabled {
                    return Err(Refusal::Disabled);
                }
                r.status = CredentialStatus::Ready;
                r.last_error = None;
                if let Some(id) = librechat_user_id {
                    r.librechat_user_id = Some(id.to_owned());
                }
                Ok(())
            })
            .await?;
        Ok(matches!(updated, Updated::Done(_)))
    }

    async fn mark_conflict(
        &self,
        user_id: &str,
        email: &str,
        message: &str,
    ) -> Result<(), BackendError> {
        Ok(record_conflict(&self.vault, user_id, email, message).await?)
    }

    async fn bind_email(&self, user_id: &str, email: &str) -> Result<Option<String>, BackendError> {
        if email == self.service.email() {
            return Ok(Some(display_owner(SERVICE_OWNER)));
        }
        Ok(match self.vault.bind_email(email, user_id).await? {
            EmailOwner::This => None,
            EmailOwner::Other(owner) => Some(display_owner(&owner)),
        })
    }

    async fn prepare_registration(&self) -> Result<(), LibreChatFailure> {
        self.service.ensure(&self.client, &self.caller).await
    }

    async fn register(
        &self,
        name: &str,
        email: &str,
        password: &str,
    ) -> Result<(), LibreChatFailure> {
        self.client
            .register(name, email, password, &self.caller)
            .await
            .map_err(failure)
    }

    async fn login(&self, email: &str, password: &str) -> Result<Option<String>, LibreChatFailure> {
        let login = self
            .client
            .login(email, password, &self.caller)
            .await
            .map_err(failure)?;
        if login.role.as_deref() == Some("ADMIN") {
            tracing::warn!(
                librechat_user = ?login.user_id,
                "a product user's LibreChat account has the ADMIN role (granted outside the BFF?)"
            );
        }
        // This confirm-login's session is not needed: log it out so sessions don't pile up.
        if let Err(e) = self
            .client
            .logout(&login.token, &login.refresh_token, &self.caller)
            .await
        {
            tracing::debug!(error = %e, "logout after confirm-login failed");
        }
        Ok(login.user_id)
    }

    async fn request_reset(&self, email: &str) -> Result<Option<String>, LibreChatFailure> {
        self.client
            .request_password_reset(email, &self.caller)
            .await
            .map_err(failure)
    }

    async fn reset_password(
        &self,
        librechat_user_id: &str,
        token: &str,
        password: &str,
    ) -> Result<(), LibreChatFailure> {
        self.client
            .reset_password(librechat_user_id, token, password, &self.caller)
            .await
            .map_err(failure)
    }
}

/// The queue and how to feed and drain it.
#[derive(Clone)]
pub struct Provisioner {
    pub queue: JobQueue,
    vault: CredentialVault,
    client: LibreChatClient,
    caller: ClientInfo,
    concurrency: usize,
    metrics: Arc<Metrics>,
    service: Arc<ServiceAccount>,
    /// Users `ensure` ran for in the last [`ENSURE_INTERVAL`]: a user hammering `/api/chat/*`
    /// while pending (or whose repair keeps failing) costs one check per interval, not one per
    /// request. Bounded: at most [`ENSURE_RECENT_CAPACITY`] users, each for the interval.
    recent: moka::sync::Cache<String, ()>,
}

/// `ensure` runs at most once per user per this interval in one process.
const ENSURE_INTERVAL: Duration = Duration::from_secs(30);
/// Users remembered by `ensure`'s throttle; beyond it some are forgotten early (costing them
/// one more check), never kept longer.
pub const ENSURE_RECENT_CAPACITY: u64 = 10_000;

impl std::fmt::Debug for Provisioner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provisioner").finish_non_exhaustive()
    }
}

impl Provisioner {
    pub fn new(
        config: &Config,
        redis: RedisHandle,
        vault: CredentialVault,
        client: LibreChatClient,
        browser_user_agent: HeaderValue,
        metrics: Arc<Metrics>,
        service: Arc<ServiceAccount>,
    ) -> Self {
        let p = &config.provisioning;
        let queue = JobQueue::with_source(
            Arc::new(redis),
            QueueConfig {
                prefix: config.redis.key_prefix.clone(),
                visibility_timeout: Duration::from_secs(p.visibility_timeout_secs),
                max_attempts: p.max_attempts,
                base_backoff: Duration::from_secs(p.base_backoff_secs),
                max_backoff: Duration::from_secs(p.max_backoff_secs),
                ..QueueConfig::default()
            },
        );
        let ip: IpAddr = p
            .forwarded_for
            .parse()
            .unwrap_or(IpAddr::from([127, 0, 0, 1]));
        Self {
            queue,
            vault,
            client,
            caller: ClientInfo {
                ip,
                user_agent: browser_user_agent,
                user_agent_substituted: true,
                proto: HeaderValue::from_static("http"),
                host: None,
            },
            concurrency: p.concurrency,
            metrics,
            service,
            recent: moka::sync::Cache::builder()
                .max_capacity(ENSURE_RECENT_CAPACITY)
                .time_to_live(ENSURE_INTERVAL)
                // A new user must always be remembered (TinyLFU could refuse a first sighting).
                .eviction_policy(moka::policy::EvictionPolicy::lru())
                .build(),
        }
    }

    /// Users `ensure`'s throttle currently remembers (after pending evictions ran).
    pub fn ensure_recent_len(&self) -> u64 {
        self.recent.run_pending_tasks();
        self.recent.entry_count()
    }

    /// Whether `ensure` should check `user_id` now (false: it did within [`ENSURE_INTERVAL`]);
    /// remembers the check.
    pub fn ensure_due(&self, user_id: &str) -> bool {
        let entry = self.recent.entry_by_ref(user_id).or_insert(());
        entry.is_fresh()
    }

    /// Seconds until the user's provisioning job runs next, for `Retry-After`: the job's
    /// `next_run_at` when it waits (backoff, LibreChat's limiter), else a small default (queued
    /// or running jobs finish within seconds, and so does a failed lookup).
    pub async fn retry_after(&self, user_id: &str) -> u64 {
        match self.next_run_in(user_id).await {
            Ok(Some(secs)) => secs,
            Ok(None) => crate::error::PROVISIONING_RETRY_SECS,
            Err(e) => {
                tracing::debug!(user = %user_id, error = %e, "cannot read the provisioning job");
                crate::error::PROVISIONING_RETRY_SECS
            }
        }
    }

    async fn next_run_in(&self, user_id: &str) -> Result<Option<u64>, QueueError> {
        let Some(id) = self.queue.active_job_of(user_id).await? else {
            return Ok(None);
        };
        let Some(job) = self.queue.job(&id).await? else {
            return Ok(None);
        };
        Ok(match (job.state, job.next_run_at) {
            // `next_run_at` is whole seconds, rounded down: +1 never answers too early.
            (JobState::Delayed, Some(at)) => {
                let left = at.saturating_add(1) - provisioning::queue::now();
                Some(u64::try_from(left).unwrap_or(0).max(1))
            }
            _ => None,
        })
    }

    /// The address and agent the BFF's own LibreChat calls (not on behalf of a request) use.
    pub fn caller(&self) -> &ClientInfo {
        &self.caller
    }

    /// A worker that runs the provisioning workflow.
    pub fn worker(&self) -> Worker {
        let backend = VaultAccounts {
            vault: self.vault.clone(),
            client: self.client.clone(),
            caller: self.caller.clone(),
            service: self.service.clone(),
        };
        Worker::new(
            self.queue.clone(),
            Arc::new(CountedWorkflow {
                workflow: ProvisionWorkflow::new(backend),
                metrics: self.metrics.clone(),
            }),
            self.concurrency,
        )
    }

    /// Runs one worker until `shutdown` turns true.
    pub fn spawn_worker(&self, shutdown: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
        let worker = self.worker();
        tokio::spawn(worker.run(shutdown))
    }

    /// Accepts a provisioning job, binding the user's email to them first: LibreChat accounts
    /// are keyed by email, so an email bound to another identity user is refused here
    /// ([`ProvisionError::EmailTaken`]) and nothing is queued. A user whose LibreChat account
    /// exists keeps the email it was created with (LibreChat offers no email change).
    pub async fn enqueue(
        &self,
        mut request: ProvisionRequest,
    ) -> Result<(String, bool), ProvisionError> {
        request.email = normalize_email(&request.email);
        if let Some(record) = self.vault.get(&request.user_id).await? {
            let stored = normalize_email(&record.email);
            // A record with a password may have a LibreChat account under its email.
            if !record.password.is_empty() && !stored.is_empty() && stored != request.email {
                tracing::info!(
                    user = %request.user_id,
                    "email change not propagated: the LibreChat account keeps the email it was created with"
                );
                request.email = stored;
            }
        }
        if request.email == self.service.email() {
            return Err(ProvisionError::EmailTaken {
                user: request.user_id,
                owner: "the BFF's LibreChat service account".into(),
            });
        }
        if let EmailOwner::Other(owner) = self
            .vault
            .bind_email(&request.email, &request.user_id)
            .await?
        {
            return Err(ProvisionError::EmailTaken {
                user: request.user_id,
                owner: display_owner(&owner),
            });
        }
        Ok(self.queue.enqueue(request).await?)
    }

    /// Just in time: make sure a user without a usable LibreChat account has a job. Cheap when
    /// one is already queued (the queue is idempotent per user).
    pub async fn ensure(&self, user: &UserInfo, source: &str) -> Result<(), ProvisionError> {
        if !self.ensure_due(&user.id) {
            return Ok(());
        }
        let record = self.vault.get(&user.id).await?;
        let (email, name) = match &record {
            Some(r) if r.status == CredentialStatus::Ready => return Ok(()),
            // A conflict needs an operator (see the runbook); re-running cannot fix it. A
            // disabled user comes back only when registered again explicitly.
            Some(r)
                if matches!(
                    r.status,
                    CredentialStatus::Conflict | CredentialStatus::Disabled
                ) =>
            {
                return Ok(())
            }
            Some(r) => (r.email.clone(), r.name.clone()),
            None => (
                user.email.clone().ok_or(ProvisionError::NoEmail)?,
                user.name.clone(),
            ),
        };
        let enqueued = self
            .enqueue(ProvisionRequest {
                user_id: user.id.clone(),
                email: email.clone(),
                name,
                source: source.to_owned(),
            })
            .await;
        let (job, created) = match enqueued {
            Err(e @ ProvisionError::EmailTaken { .. }) => {
                tracing::warn!(user = %user.id, error = %e, "provisioning refused");
                record_conflict(
                    &self.vault,
                    &user.id,
                    &normalize_email(&email),
                    &e.to_string(),
                )
                .await?;
                return Err(e);
            }
            other => other?,
        };
        if created {
            tracing::info!(user = %user.id, %job, source, "provisioning job enqueued");
        }
        Ok(())
    }
}

/// The workflow, counting outcomes for `bff_provisioning_jobs_total`.
struct CountedWorkflow {
    workflow: ProvisionWorkflow<VaultAccounts>,
    metrics: Arc<Metrics>,
}

#[async_trait]
impl JobHandler for CountedWorkflow {
    async fn handle(&self, job: &Job) -> Outcome {
        let outcome = self.workflow.run(&job.request).await;
        let label = match &outcome {
            Outcome::Done => "done",
            Outcome::Retry { .. } => "retry",
            Outcome::Dead { .. } => "dead",
        };
        self.metrics
            .jobs
            .get_or_create(&OutcomeLabels { outcome: label })
            .inc();
        outcome
    }
}

/// Marks a user's credential `conflict` (sign-in then says so, and just-in-time provisioning
/// stops retrying); a user with no record yet gets a passwordless one carrying the message.
async fn record_conflict(
    vault: &CredentialVault,
    user_id: &str,
    email: &str,
    message: &str,
) -> Result<(), VaultError> {
    if vault
        .set_status(
            user_id,
            CredentialStatus::Conflict,
            Some(message.to_owned()),
        )
        .await?
    {
        return Ok(());
    }
    let mut record = vault.new_record(
        user_id,
        email,
        None,
        &Password::new(""),
        CredentialStatus::Conflict,
    );
    record.password = String::new();
    record.last_error = Some(message.to_owned());
    vault.create(&record).await?;
    Ok(())
}

/// How an email binding's owner is named in messages.
fn display_owner(owner: &str) -> String {
    if owner == SERVICE_OWNER {
        "the BFF's LibreChat service account".into()
    } else {
        format!("identity user {owner}")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("the identity token carries no email, which LibreChat needs")]
    NoEmail,
    #[error(
        "the email of user {user} is already bound to {owner}, who owns that LibreChat account; \
         nothing was queued. Find out at the identity service which of the two really owns the \
         address: the BFF never moves a LibreChat account between users"
    )]
    EmailTaken { user: String, owner: String },
    #[error(transparent)]
    Vault(#[from] VaultError),
    #[error(transparent)]
    Queue(#[from] QueueError),
}
