//! Provisioning one user's LibreChat account.
//!
//! 1. Reuse the password already in the vault, or generate one and store it (status
//!    `provisioning`) BEFORE calling LibreChat, so a crash after registering loses nothing.
//! 2. Register (name clamped to LibreChat's 3–80 characters). LibreChat answers 200 for an email
//!    that already exists, so success proves nothing yet.
//! 3. Log in to confirm, and record the LibreChat user id (status `ready`).
//! 4. A refused confirm-login means the account exists with another password: recover it with
//!    requestPasswordReset → link → resetPassword when LibreChat allows it, else `conflict`.
//!
//! Rate limits retry after the advertised delay without spending an attempt; outages back off;
//! validation errors dead-letter with LibreChat's reason.

use std::time::Duration;

use async_trait::async_trait;
use rand::RngExt as _;

use crate::{
    queue::{Job, ProvisionRequest},
    worker::{JobHandler, Outcome},
};

/// How a LibreChat call failed, as far as the workflow cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LibreChatFailure {
    RateLimited(Duration),
    Unavailable(String),
    /// Refused input (validation 404, domain 403, ...): retrying cannot help.
    Invalid(String),
    /// Login refused the email/password.
    BadCredentials,
    /// The feature is switched off on the server (registration, password reset).
    Disabled(String),
}

/// The stored credential's state, as the workflow needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoredCredential {
    None,
    /// Ready: nothing to do.
    Ready,
    /// Deactivated: nothing may be done until ops or the identity service register them again.
    Disabled,
    /// A password exists but is not confirmed (`provisioning`, `drifted` or `conflict`). `email`
    /// is the one the account was created with: it stays the account's key for good.
    Unconfirmed {
        password: String,
        email: String,
        drifted: bool,
    },
}

/// LibreChat's own form of an email (it trims and lower-cases on register and login), so two
/// spellings of one address are one account — and one binding.
pub fn normalize_email(email: &str) -> String {
    email.trim().to_lowercase()
}

/// Whether `email` (normalised) is an address LibreChat's validator and any mail system would
/// take: `local@domain.tld`, at most 254 characters (local part 64), no spaces, quotes, angle
/// brackets or control characters, no leading/trailing/double dots.
pub fn is_valid_email(email: &str) -> bool {
    // Control characters anywhere (a trailing CR/LF included) are refused, not trimmed.
    if email.chars().any(char::is_control) {
        return false;
    }
    let email = email.trim();
    if email.len() > 254 || email.chars().any(char::is_whitespace) {
        return false;
    }
    let Some((local, domain)) = email.rsplit_once('@') else {
        return false;
    };
    let dots_ok = |s: &str| !s.starts_with('.') && !s.ends_with('.') && !s.contains("..");
    let local_ok = !local.is_empty()
        && local.len() <= 64
        && dots_ok(local)
        && local
            .chars()
            .all(|c| c.is_alphanumeric() || "!#$%&'*+-/=?^_`{|}~.".contains(c));
    let labels: Vec<&str> = domain.split('.').collect();
    let domain_ok = labels.len() >= 2
        && dots_ok(domain)
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_alphanumeric() || c == '-')
        })
        && labels
            .last()
            .is_some_and(|tld| tld.len() >= 2 && tld.chars().all(char::is_alphabetic));
    local_ok && domain_ok
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BackendError(pub String);

/// What the workflow needs from the vault and from LibreChat.
#[async_trait]
pub trait AccountBackend: Send + Sync + 'static {
    async fn credential(&self, user_id: &str) -> Result<StoredCredential, BackendError>;
    /// Stores `password` for the user with status `provisioning`, unless the user has a record
    /// already (`false`: e.g. a deactivation arrived meanwhile).
    async fn store_password(
        &self,
        request: &ProvisionRequest,
        password: &str,
    ) -> Result<bool, BackendError>;
    /// `false`: the user was deactivated meanwhile and stays so.
    async fn mark_ready(
        &self,
        user_id: &str,
        librechat_user_id: Option<&str>,
    ) -> Result<bool, BackendError>;
    async fn mark_conflict(
        &self,
        user_id: &str,
        email: &str,
        message: &str,
    ) -> Result<(), BackendError>;
    /// Binds `email` to `user_id` unless another user holds it; returns that other user.
    async fn bind_email(&self, user_id: &str, email: &str) -> Result<Option<String>, BackendError>;
    /// Called before a product user is registered: LibreChat makes its FIRST account `ADMIN`,
    /// so that account must be the BFF's reserved service account, never a product user.
    async fn prepare_registration(&self) -> Result<(), LibreChatFailure>;

    async fn register(
        &self,
        name: &str,
        email: &str,
        password: &str,
    ) -> Result<(), LibreChatFailure>;
    /// Logs in; returns LibreChat's user id when it says.
    async fn login(&self, email: &str, password: &str) -> Result<Option<String>, LibreChatFailure>;
    /// `POST /api/auth/requestPasswordReset`: the reset link when no email service is set up.
    async fn request_reset(&self, email: &str) -> Result<Option<String>, LibreChatFailure>;
    async fn reset_password(
        &self,
        librechat_user_id: &str,
        token: &str,
        password: &str,
    ) -> Result<(), LibreChatFailure>;
}

/// A strong random password LibreChat accepts (8–128 characters; 32 here).
pub fn generate_password() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789-_.!@#%^*+=";
    let mut rng = rand::rng();
    (0..32)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// A display name within LibreChat's 3–80 characters, from the email when absent.
pub fn librechat_name(name: Option<&str>, email: &str) -> String {
    let base = name
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .unwrap_or_else(|| email.split('@').next().unwrap_or(email).to_owned());
    let mut name: String = base.chars().take(80).collect();
    while name.chars().count() < 3 {
        name.push('_');
    }
    name
}

/// The provisioning workflow as a queue job handler.
pub struct ProvisionWorkflow<B> {
    backend: B,
}

impl<B: AccountBackend> ProvisionWorkflow<B> {
    pub fn new(backend: B) -> Self {
        Self { backend }
    }

    pub async fn run(&self, request: &ProvisionRequest) -> Outcome {
        match self.steps(request).await {
            Ok(outcome) => outcome,
            Err(e) => Outcome::Retry {
                error: format!("credential store: {e}"),
                after: None,
                spend_attempt: true,
            },
        }
    }

    async fn steps(&self, req: &ProvisionRequest) -> Result<Outcome, BackendError> {
        let b = &self.backend;
        let deactivated = || Outcome::Dead {
            reason: format!("user {} is deactivated", req.user_id),
        };
        let (password, email, drifted, stored) = match b.credential(&req.user_id).await? {
            StoredCredential::Ready => return Ok(Outcome::Done),
            StoredCredential::Disabled => return Ok(deactivated()),
            StoredCredential::Unconfirmed {
                password,
                email,
                drifted,
            } => (password, email, drifted, true),
            StoredCredential::None => (
                generate_password(),
                normalize_email(&req.email),
                false,
                false,
            ),
        };
        // LibreChat accounts are keyed by email: only the user the email is bound to may
        // register, log in to or reset that account — never anyone else.
        if let Some(owner) = b.bind_email(&req.user_id, &email).await? {
            let msg = format!(
                "the email of user {} is already bound to {owner}, who owns that \
                 LibreChat account; nothing was registered or reset. Fix: find out at the identity \
                 service which of the two users really owns the address; the BFF never moves a \
                 LibreChat account between users (see README, Security model)",
                req.user_id
            );
            b.mark_conflict(&req.user_id, &email, &msg).await?;
            return Ok(Outcome::Dead { reason: msg });
        }
        if !stored {
            let mut with_email = req.clone();
            with_email.email = email.clone();
            if !b.store_password(&with_email, &password).await? {
                // A record appeared meanwhile (a deactivation, another run): start over later.
                return Ok(Outcome::Retry {
                    error: "the credential changed while provisioning started".into(),
                    after: Some(Duration::from_secs(1)),
                    spend_attempt: true,
                });
            }
        }
        // A drifted credential belongs to an account that exists: skip registration.
        if !drifted {
            if let Err(f) = b.prepare_registration().await {
                return Ok(failure_outcome("register (the BFF's service account)", f));
            }
            let name = librechat_name(req.name.as_deref(), &email);
            if let Err(f) = b.register(&name, &email, &password).await {
                return Ok(failure_outcome("register", f));
            }
        }
        match b.login(&email, &password).await {
            Ok(librechat_id) => {
                if !b.mark_ready(&req.user_id, librechat_id.as_deref()).await? {
                    return Ok(deactivated());
                }
                Ok(Outcome::Done)
            }
            Err(LibreChatFailure::BadCredentials) => self.recover(req, &email, &password).await,
            Err(f) => Ok(failure_outcome("login", f)),
        }
    }

    /// The account exists with a password we do not know: reset it to ours.
    async fn recover(
        &self,
        req: &ProvisionRequest,
        email: &str,
        password: &str,
    ) -> Result<Outcome, BackendError> {
        let b = &self.backend;
        let conflict = |why: &str| {
            format!(
                "LibreChat already has an account for {} with a password the BFF does not know, \
                 and {why}. Fix: set ALLOW_PASSWORD_RESET=true on LibreChat with no email service \
                 configured, then retry this job; or delete that LibreChat account and retry.",
                email
            )
        };
        let link = match b.request_reset(email).await {
            Ok(Some(link)) => link,
            Ok(None) => {
                let msg = conflict("LibreChat mails reset links instead of returning them");
                b.mark_conflict(&req.user_id, email, &msg).await?;
                return Ok(Outcome::Dead { reason: msg });
            }
            Err(LibreChatFailure::Disabled(_)) => {
                let msg = conflict("password reset is disabled (ALLOW_PASSWORD_RESET)");
                b.mark_conflict(&req.user_id, email, &msg).await?;
                return Ok(Outcome::Dead { reason: msg });
            }
            Err(f) => return Ok(failure_outcome("requestPasswordReset", f)),
        };
        let Some((token, librechat_id)) = parse_reset_link(&link) else {
            let msg = conflict("the reset link has no token/userId");
            b.mark_conflict(&req.user_id, email, &msg).await?;
            return Ok(Outcome::Dead { reason: msg });
        };
        if let Err(f) = b.reset_password(&librechat_id, &token, password).await {
            return Ok(failure_outcome("resetPassword", f));
        }
        match b.login(email, password).await {
            Ok(id) => {
                if !b
                    .mark_ready(&req.user_id, id.as_deref().or(Some(&librechat_id)))
                    .await?
                {
                    return Ok(Outcome::Dead {
                        reason: format!("user {} is deactivated", req.user_id),
                    });
                }
                tracing::info!(user = %req.user_id, "LibreChat password recovered through reset");
                Ok(Outcome::Done)
            }
            Err(f) => Ok(failure_outcome("login after reset", f)),
        }
    }
}

fn failure_outcome(step: &str, f: LibreChatFailure) -> Outcome {
    match f {
        LibreChatFailure::RateLimited(after) => Outcome::Retry {
            error: format!("{step}: LibreChat rate limit"),
            after: Some(after),
            spend_attempt: false,
        },
        LibreChatFailure::Unavailable(e) => Outcome::Retry {
            error: format!("{step}: {e}"),
            after: None,
            spend_attempt: true,
        },
        LibreChatFailure::BadCredentials => Outcome::Retry {
            error: format!("{step}: LibreChat refused the credentials"),
            after: None,
            spend_attempt: true,
        },
        LibreChatFailure::Invalid(reason) => Outcome::Dead {
            reason: format!("{step}: LibreChat rejected the request: {reason}"),
        },
        LibreChatFailure::Disabled(reason) => Outcome::Dead {
            reason: format!("{step}: {reason}"),
        },
    }
}

/// `token` and `userId` from `<DOMAIN_CLIENT>/reset-password?token=<hex>&userId=<id>`.
pub fn parse_reset_link(link: &str) -> Option<(String, String)> {
    let query = link.split_once('?')?.1;
    let mut token = None;
    let mut user = None;
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("token", v)) if !v.is_empty() => token = Some(v.to_owned()),
            Some(("userId", v)) if !v.is_empty() => user = Some(v.to_owned()),
            _ => {}
        }
    }
    Some((token?, user?))
}

#[async_trait]
impl<B: AccountBackend> JobHandler for ProvisionWorkflow<B> {
    async fn handle(&self, job: &Job) -> Outcome {
        self.run(&job.request).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_clamped_to_librechat_rules() {
        assert_eq!(librechat_name(None, "jo@example.com"), "jo_");
        assert_eq!(librechat_name(Some("  "), "alice@example.com"), "alice");
        assert_eq!(librechat_name(Some(&"x".repeat(100)), "a@b.c").len(), 80);
        assert_eq!(
            librechat_name(Some("Zoë Ölund"), "z@example.com"),
            "Zoë Ölund"
        );
    }

    #[test]
    fn emails_are_validated_and_normalised() {
        assert_eq!(normalize_email("  Alice@Example.COM "), "alice@example.com");
        for ok in ["a@b.co", "first.last+tag@sub.example.org", "Zoë@exämple.de"] {
            assert!(is_valid_email(ok), "{ok}");
        }
        for bad in [
            "",
            "a",
            "a@b",
            "@b.co",
            "a@.co",
            "a@b.c",
            "a b@c.de",
            "a@b.co\r\nBcc: x@y.zz",
            "a\u{0}@b.co",
            "a..b@c.de",
            ".a@b.co",
            "a@b..co",
            "<a@b.co>",
            "a@-b.co",
            "a@b.c0",
        ] {
            assert!(!is_valid_email(bad), "{bad:?}");
        }
        assert!(!is_valid_email(&format!("{}@b.co", "a".repeat(65))));
    }

    #[test]
    fn passwords_are_long_and_varied() {
        let a = generate_password();
        let b = generate_password();
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }

    #[test]
    fn reset_links_parse() {
        assert_eq!(
            parse_reset_link("http://lc/reset-password?token=abc123&userId=u1"),
            Some(("abc123".into(), "u1".into()))
        );
        assert_eq!(parse_reset_link("http://lc/reset-password"), None);
    }
}
