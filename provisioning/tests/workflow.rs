//! The provisioning decisions of [`ProvisionWorkflow`], against a scripted [`AccountBackend`]:
//! each test says what the vault holds and what LibreChat answers, then checks the calls made
//! (in order) and the outcome.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use provisioning::{
    workflow::BackendError, AccountBackend, Job, JobHandler, JobState, LibreChatFailure, Outcome,
    ProvisionRequest, ProvisionWorkflow, StoredCredential,
};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    Credential(String),
    StorePassword {
        user: String,
        password: String,
    },
    MarkReady {
        user: String,
        librechat_id: Option<String>,
    },
    MarkConflict {
        user: String,
        message: String,
    },
    BindEmail {
        user: String,
        email: String,
    },
    PrepareRegistration,
    Register {
        name: String,
        email: String,
        password: String,
    },
    Login {
        email: String,
        password: String,
    },
    RequestReset(String),
    ResetPassword {
        librechat_id: String,
        token: String,
        password: String,
    },
}

/// What the vault holds and LibreChat answers. Unscripted LibreChat calls succeed
/// (`register`, `reset_password`), log in as `lc-1` (`login`), or fail the test
/// (`request_reset`, which only a refused login may lead to).
struct Scripted {
    credential: Result<StoredCredential, String>,
    store_fails: bool,
    /// Another identity user the email is bound to.
    email_owner: Option<String>,
    /// `mark_ready` finds the user deactivated.
    deactivated_meanwhile: bool,
    register: VecDeque<Result<(), LibreChatFailure>>,
    login: VecDeque<Result<Option<String>, LibreChatFailure>>,
    request_reset: VecDeque<ResetAnswer>,
    reset_password: VecDeque<Result<(), LibreChatFailure>>,
}

impl Default for Scripted {
    fn default() -> Self {
        Self {
            credential: Ok(StoredCredential::None),
            store_fails: false,
            email_owner: None,
            deactivated_meanwhile: false,
            register: VecDeque::new(),
            login: VecDeque::new(),
            request_reset: VecDeque::new(),
            reset_password: VecDeque::new(),
        }
    }
}

struct Inner {
    script: Mutex<Scripted>,
    calls: Mutex<Vec<Call>>,
}

#[derive(Clone)]
struct Backend(Arc<Inner>);

impl Backend {
    fn new(script: Scripted) -> Self {
        Self(Arc::new(Inner {
            script: Mutex::new(script),
            calls: Mutex::new(Vec::new()),
        }))
    }

    fn record(&self, call: Call) {
        self.0.calls.lock().expect("lock").push(call);
    }

    /// Every call, in order, the gates (binding, service account) included.
    fn all_calls(&self) -> Vec<Call> {
        self.0.calls.lock().expect("lock").clone()
    }

    /// The calls without the gates.
    fn calls(&self) -> Vec<Call> {
        self.all_calls()
            .into_iter()
            .filter(|c| !matches!(c, Call::BindEmail { .. } | Call::PrepareRegistration))
            .collect()
    }

    fn script(&self) -> std::sync::MutexGuard<'_, Scripted> {
        self.0.script.lock().expect("lock")
    }

    /// The password stored by `store_password`, if any.
    fn stored_password(&self) -> Option<String> {
        self.calls().into_iter().find_map(|c| match c {
            Call::StorePassword { password, .. } => Some(password),
            _ => None,
        })
    }

    fn librechat_calls(&self) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| {
                !matches!(
                    c,
                    Call::Credential(_)
                        | Call::StorePassword { .. }
                        | Call::MarkReady { .. }
                        | Call::MarkConflict { .. }
                )
            })
            .collect()
    }
}

#[async_trait]
impl AccountBackend for Backend {
    async fn credential(&self, user_id: &str) -> Result<StoredCredential, BackendError> {
        self.record(Call::Credential(user_id.to_owned()));
        self.script().credential.clone().map_err(BackendError)
    }

    async fn store_password(
        &self,
        request: &ProvisionRequest,
        password: &str,
    ) -> Result<bool, BackendError> {
        self.record(Call::StorePassword {
            user: request.user_id.clone(),
            password: password.to_owned(),
        });
        if self.script().store_fails {
            return Err(BackendError("vault is read-only".into()));
        }
        Ok(true)
    }

    async fn mark_ready(
        &self,
        user_id: &str,
        librechat_user_id: Option<&str>,
    ) -> Result<bool, BackendError> {
        self.record(Call::MarkReady {
            user: user_id.to_owned(),
            librechat_id: librechat_user_id.map(str::to_owned),
        });
        Ok(!self.script().deactivated_meanwhile)
    }

    async fn mark_conflict(
        &self,
        user_id: &str,
        _email: &str,
        message: &str,
    ) -> Result<(), BackendError> {
        self.record(Call::MarkConflict {
            user: user_id.to_owned(),
            message: message.to_owned(),
        });
        Ok(())
    }

    async fn bind_email(&self, user_id: &str, email: &str) -> Result<Option<String>, BackendError> {
        self.record(Call::BindEmail {
            user: user_id.to_owned(),
            email: email.to_owned(),
        });
        Ok(self.script().email_owner.clone())
    }

    async fn prepare_registration(&self) -> Result<(), LibreChatFailure> {
        self.record(Call::PrepareRegistration);
        Ok(())
    }

    async fn register(
        &self,
        name: &str,
        email: &str,
        password: &str,
    ) -> Result<(), LibreChatFailure> {
        self.record(Call::Register {
            name: name.to_owned(),
            email: email.to_owned(),
            password: password.to_owned(),
        });
        self.script().register.pop_front().unwrap_or(Ok(()))
    }

    async fn login(&self, email: &str, password: &str) -> Result<Option<String>, LibreChatFailure> {
        self.record(Call::Login {
            email: email.to_owned(),
            password: password.to_owned(),
        });
        self.script()
            .login
            .pop_front()
            .unwrap_or_else(|| Ok(Some("lc-1".into())))
    }

    async fn request_reset(&self, email: &str) -> Result<Option<String>, LibreChatFailure> {
        self.record(Call::RequestReset(email.to_owned()));
        self.script()
            .request_reset
            .pop_front()
            .unwrap_or_else(|| panic!("unscripted requestPasswordReset for {email}"))
    }

    async fn reset_password(
        &self,
        librechat_user_id: &str,
        token: &str,
        password: &str,
    ) -> Result<(), LibreChatFailure> {
        self.record(Call::ResetPassword {
            librechat_id: librechat_user_id.to_owned(),
            token: token.to_owned(),
            password: password.to_owned(),
        });
        self.script().reset_password.pop_front().unwrap_or(Ok(()))
    }
}

const USER: &str = "user-1";
const EMAIL: &str = "alice@example.com";

fn request() -> ProvisionRequest {
    ProvisionRequest {
        user_id: USER.into(),
        email: EMAIL.into(),
        name: Some("Alice Example".into()),
        source: "test".into(),
    }
}

async fn run(script: Scripted) -> (Outcome, Backend) {
    let backend = Backend::new(script);
    let outcome = ProvisionWorkflow::new(backend.clone())
        .run(&request())
        .await;
    (outcome, backend)
}

fn unconfirmed(password: &str, drifted: bool) -> Result<StoredCredential, String> {
    Ok(StoredCredential::Unconfirmed {
        password: password.into(),
        email: EMAIL.into(),
        drifted,
    })
}

fn register(password: &str) -> Call {
    Call::Register {
        name: "Alice Example".into(),
        email: EMAIL.into(),
        password: password.into(),
    }
}

fn login(password: &str) -> Call {
    Call::Login {
        email: EMAIL.into(),
        password: password.into(),
    }
}

fn ready(librechat_id: Option<&str>) -> Call {
    Call::MarkReady {
        user: USER.into(),
        librechat_id: librechat_id.map(str::to_owned),
    }
}

// ---------------------------------------------------------------------------------------------
// The happy path
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn the_email_is_bound_before_anything_is_stored_or_registered() {
    let (outcome, b) = run(Scripted::default()).await;
    assert_eq!(outcome, Outcome::Done);
    let calls = b.all_calls();
    let at = |pred: &dyn Fn(&Call) -> bool| calls.iter().position(pred).expect("call made");
    let bind = at(&|c| matches!(c, Call::BindEmail { .. }));
    let store = at(&|c| matches!(c, Call::StorePassword { .. }));
    let prepare = at(&|c| matches!(c, Call::PrepareRegistration));
    let register = at(&|c| matches!(c, Call::Register { .. }));
    assert!(
        bind < store && store < prepare && prepare < register,
        "{calls:?}"
    );
    assert_eq!(
        calls[bind],
        Call::BindEmail {
            user: USER.into(),
            email: EMAIL.into()
        }
    );
}

#[tokio::test]
async fn an_email_bound_to_another_user_is_never_registered_logged_in_or_reset() {
    for credential in [
        Ok(StoredCredential::None),
        unconfirmed("pw-of-this-user", true),
        unconfirmed("pw-of-this-user", false),
    ] {
        let (outcome, b) = run(Scripted {
            credential,
            email_owner: Some("identity user victim-7".into()),
            ..Scripted::default()
        })
        .await;
        assert!(
            b.librechat_calls().is_empty(),
            "LibreChat was called for an email bound to someone else: {:?}",
            b.calls()
        );
        assert!(
            !b.calls()
                .iter()
                .any(|c| matches!(c, Call::StorePassword { .. } | Call::MarkReady { .. })),
            "{:?}",
            b.calls()
        );
        let conflict = b.calls().into_iter().find_map(|c| match c {
            Call::MarkConflict { message, .. } => Some(message),
            _ => None,
        });
        let message = conflict.expect("the user is marked conflict");
        assert!(
            message.contains(USER) && message.contains("victim-7"),
            "the message names both users: {message}"
        );
        match outcome {
            Outcome::Dead { reason } => assert!(reason.contains("victim-7"), "{reason}"),
            other => panic!("expected dead, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_deactivated_user_is_not_provisioned() {
    let (outcome, b) = run(Scripted {
        credential: Ok(StoredCredential::Disabled),
        ..Scripted::default()
    })
    .await;
    assert_eq!(b.all_calls(), vec![Call::Credential(USER.into())]);
    assert!(matches!(outcome, Outcome::Dead { reason } if reason.contains("deactivated")));
}

#[tokio::test]
async fn a_deactivation_during_the_run_ends_it_dead_not_done() {
    let (outcome, b) = run(Scripted {
        deactivated_meanwhile: true,
        ..Scripted::default()
    })
    .await;
    assert!(b
        .calls()
        .iter()
        .any(|c| matches!(c, Call::MarkReady { .. })));
    assert!(
        matches!(&outcome, Outcome::Dead { reason } if reason.contains("deactivated")),
        "{outcome:?}"
    );
}

#[tokio::test]
async fn a_new_user_gets_a_password_stored_before_registering_then_is_confirmed() {
    let (outcome, b) = run(Scripted::default()).await;
    assert_eq!(outcome, Outcome::Done);
    let password = b.stored_password().expect("a password was stored");
    assert_eq!(password.len(), 32);
    assert_eq!(
        b.calls(),
        vec![
            Call::Credential(USER.into()),
            Call::StorePassword {
                user: USER.into(),
                password: password.clone(),
            },
            register(&password),
            login(&password),
            ready(Some("lc-1")),
        ],
        "stored first, then registered, then confirmed by logging in"
    );
}

#[tokio::test]
async fn nothing_is_registered_when_the_password_cannot_be_stored() {
    let (outcome, b) = run(Scripted {
        store_fails: true,
        ..Scripted::default()
    })
    .await;
    assert!(
        b.librechat_calls().is_empty(),
        "LibreChat was called without the password being saved: {:?}",
        b.calls()
    );
    match outcome {
        Outcome::Retry {
            error,
            spend_attempt: true,
            after: None,
        } => assert!(error.contains("vault is read-only"), "{error}"),
        other => panic!("expected a retry, got {other:?}"),
    }
}

#[tokio::test]
async fn a_credential_store_outage_is_retried_with_backoff() {
    let (outcome, b) = run(Scripted {
        credential: Err("vault unreachable".into()),
        ..Scripted::default()
    })
    .await;
    assert_eq!(b.calls(), vec![Call::Credential(USER.into())]);
    match outcome {
        Outcome::Retry {
            error,
            after: None,
            spend_attempt: true,
        } => assert!(error.contains("vault unreachable"), "{error}"),
        other => panic!("expected a retry, got {other:?}"),
    }
}

#[tokio::test]
async fn a_missing_name_is_derived_from_the_email_within_librechat_limits() {
    let backend = Backend::new(Scripted::default());
    let outcome = ProvisionWorkflow::new(backend.clone())
        .run(&ProvisionRequest {
            user_id: USER.into(),
            email: "jo@example.com".into(),
            name: None,
            source: "test".into(),
        })
        .await;
    assert_eq!(outcome, Outcome::Done);
    let name = backend.calls().into_iter().find_map(|c| match c {
        Call::Register { name, .. } => Some(name),
        _ => None,
    });
    assert_eq!(name.as_deref(), Some("jo_"));
}

// ---------------------------------------------------------------------------------------------
// LibreChat failures
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_rate_limited_register_waits_the_advertised_delay_without_spending_an_attempt() {
    let (outcome, b) = run(Scripted {
        register: [Err(LibreChatFailure::RateLimited(Duration::from_secs(37)))].into(),
        ..Scripted::default()
    })
    .await;
    match outcome {
        Outcome::Retry {
            after,
            spend_attempt,
            error,
        } => {
            assert_eq!(after, Some(Duration::from_secs(37)), "the advertised delay");
            assert!(!spend_attempt, "a rate limit does not spend an attempt");
            assert!(error.contains("register"), "{error}");
        }
        other => panic!("expected a retry, got {other:?}"),
    }
    let password = b.stored_password().expect("stored");
    assert_eq!(b.librechat_calls(), vec![register(&password)], "no login");
}

#[tokio::test]
async fn a_rate_limited_login_waits_too() {
    let (outcome, _) = run(Scripted {
        login: [Err(LibreChatFailure::RateLimited(Duration::from_secs(5)))].into(),
        ..Scripted::default()
    })
    .await;
    assert!(
        matches!(
            outcome,
            Outcome::Retry {
                after: Some(d),
                spend_attempt: false,
                ..
            } if d == Duration::from_secs(5)
        ),
        "{outcome:?}"
    );
}

#[tokio::test]
async fn librechat_unavailable_is_retried_with_backoff_spending_an_attempt() {
    let (outcome, b) = run(Scripted {
        register: [Err(LibreChatFailure::Unavailable(
            "connection refused".into(),
        ))]
        .into(),
        ..Scripted::default()
    })
    .await;
    match outcome {
        Outcome::Retry {
            error,
            after,
            spend_attempt,
        } => {
            assert_eq!(after, None, "the queue's backoff decides");
            assert!(spend_attempt);
            assert!(
                error.contains("register") && error.contains("connection refused"),
                "{error}"
            );
        }
        other => panic!("expected a retry, got {other:?}"),
    }
    assert!(!b
        .calls()
        .iter()
        .any(|c| matches!(c, Call::MarkReady { .. })));
}

#[tokio::test]
async fn a_validation_error_dead_letters_with_librechat_reason() {
    let (outcome, b) = run(Scripted {
        register: [Err(LibreChatFailure::Invalid(
            "Email domain not allowed".into(),
        ))]
        .into(),
        ..Scripted::default()
    })
    .await;
    match outcome {
        Outcome::Dead { reason } => assert!(
            reason.contains("register") && reason.contains("Email domain not allowed"),
            "{reason}"
        ),
        other => panic!("expected dead, got {other:?}"),
    }
    let password = b.stored_password().expect("stored");
    assert_eq!(b.librechat_calls(), vec![register(&password)]);
}

#[tokio::test]
async fn disabled_registration_dead_letters() {
    let (outcome, _) = run(Scripted {
        register: [Err(LibreChatFailure::Disabled(
            "registration is disabled".into(),
        ))]
        .into(),
        ..Scripted::default()
    })
    .await;
    assert!(
        matches!(&outcome, Outcome::Dead { reason } if reason.contains("registration is disabled")),
        "{outcome:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// An account that exists with another password
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_refused_login_recovers_the_account_through_a_password_reset() {
    let (outcome, b) = run(Scripted {
        login: [
            Err(LibreChatFailure::BadCredentials),
            Ok(Some("lc-9".into())),
        ]
        .into(),
        request_reset: [Ok(Some(
            "https://chat.example.com/reset-password?token=tok123&userId=lc-9".into(),
        ))]
        .into(),
        ..Scripted::default()
    })
    .await;
    assert_eq!(outcome, Outcome::Done);
    let password = b.stored_password().expect("stored");
    assert_eq!(
        b.librechat_calls(),
        vec![
            register(&password),
            login(&password),
            Call::RequestReset(EMAIL.into()),
            Call::ResetPassword {
                librechat_id: "lc-9".into(),
                token: "tok123".into(),
                password: password.clone(),
            },
            login(&password),
        ]
    );
    assert_eq!(b.calls().last(), Some(&ready(Some("lc-9"))));
    assert!(!b
        .calls()
        .iter()
        .any(|c| matches!(c, Call::MarkConflict { .. })));
}

#[tokio::test]
async fn after_a_reset_the_librechat_id_comes_from_the_link_when_login_does_not_say() {
    let (outcome, b) = run(Scripted {
        login: [Err(LibreChatFailure::BadCredentials), Ok(None)].into(),
        request_reset: [Ok(Some(
            "http://lc/reset-password?userId=lc-42&token=abc".into(),
        ))]
        .into(),
        ..Scripted::default()
    })
    .await;
    assert_eq!(outcome, Outcome::Done);
    assert_eq!(b.calls().last(), Some(&ready(Some("lc-42"))));
}

/// What `requestPasswordReset` answers.
type ResetAnswer = Result<Option<String>, LibreChatFailure>;

/// The ways recovery can be impossible, and a word each conflict message must contain.
#[tokio::test]
async fn when_reset_is_impossible_the_account_is_marked_conflict_with_instructions() {
    let cases: Vec<(&str, ResetAnswer, &str)> = vec![
        (
            "reset disabled",
            Err(LibreChatFailure::Disabled("password reset is off".into())),
            "password reset is disabled",
        ),
        ("link mailed", Ok(None), "mails reset links"),
        (
            "link without token",
            Ok(Some("http://lc/reset-password?userId=lc-1".into())),
            "no token/userId",
        ),
    ];
    for (case, answer, why) in cases {
        let (outcome, b) = run(Scripted {
            login: [Err(LibreChatFailure::BadCredentials)].into(),
            request_reset: [answer].into(),
            ..Scripted::default()
        })
        .await;
        let message = b
            .calls()
            .into_iter()
            .find_map(|c| match c {
                Call::MarkConflict { user, message } => {
                    assert_eq!(user, USER);
                    Some(message)
                }
                _ => None,
            })
            .unwrap_or_else(|| panic!("{case}: not marked conflict: {:?}", b.calls()));
        for needle in [
            why,
            EMAIL,
            "ALLOW_PASSWORD_RESET=true",
            "retry this job",
            "delete",
        ] {
            assert!(
                message.contains(needle),
                "{case}: the conflict message should mention {needle:?}: {message}"
            );
        }
        assert_eq!(
            outcome,
            Outcome::Dead {
                reason: message.clone()
            },
            "{case}"
        );
        assert!(
            !b.calls()
                .iter()
                .any(|c| matches!(c, Call::ResetPassword { .. } | Call::MarkReady { .. })),
            "{case}: {:?}",
            b.calls()
        );
    }
}

#[tokio::test]
async fn a_reset_request_outage_is_retried() {
    let (outcome, b) = run(Scripted {
        login: [Err(LibreChatFailure::BadCredentials)].into(),
        request_reset: [Err(LibreChatFailure::Unavailable("502".into()))].into(),
        ..Scripted::default()
    })
    .await;
    assert!(
        matches!(&outcome, Outcome::Retry { spend_attempt: true, error, .. } if error.contains("requestPasswordReset")),
        "{outcome:?}"
    );
    assert!(!b
        .calls()
        .iter()
        .any(|c| matches!(c, Call::MarkConflict { .. })));
}

#[tokio::test]
async fn a_login_still_refused_after_the_reset_is_retried() {
    let (outcome, b) = run(Scripted {
        login: [
            Err(LibreChatFailure::BadCredentials),
            Err(LibreChatFailure::BadCredentials),
        ]
        .into(),
        request_reset: [Ok(Some("http://lc/reset-password?token=t&userId=u".into()))].into(),
        ..Scripted::default()
    })
    .await;
    assert!(
        matches!(&outcome, Outcome::Retry { spend_attempt: true, error, .. } if error.contains("login after reset")),
        "{outcome:?}"
    );
    assert!(!b
        .calls()
        .iter()
        .any(|c| matches!(c, Call::MarkReady { .. })));
}

// ---------------------------------------------------------------------------------------------
// What the vault already holds
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_ready_credential_is_done_without_calling_librechat() {
    let (outcome, b) = run(Scripted {
        credential: Ok(StoredCredential::Ready),
        ..Scripted::default()
    })
    .await;
    assert_eq!(outcome, Outcome::Done);
    assert_eq!(b.calls(), vec![Call::Credential(USER.into())]);
}

#[tokio::test]
async fn an_unconfirmed_password_is_reused() {
    let (outcome, b) = run(Scripted {
        credential: unconfirmed("kept-password-0123456789", false),
        ..Scripted::default()
    })
    .await;
    assert_eq!(outcome, Outcome::Done);
    assert_eq!(b.stored_password(), None, "no new password generated");
    assert_eq!(
        b.calls(),
        vec![
            Call::Credential(USER.into()),
            register("kept-password-0123456789"),
            login("kept-password-0123456789"),
            ready(Some("lc-1")),
        ]
    );
}

#[tokio::test]
async fn a_drifted_credential_skips_registration() {
    let (outcome, b) = run(Scripted {
        credential: unconfirmed("drifted-password-0123456789", true),
        ..Scripted::default()
    })
    .await;
    assert_eq!(outcome, Outcome::Done);
    assert_eq!(
        b.calls(),
        vec![
            Call::Credential(USER.into()),
            login("drifted-password-0123456789"),
            ready(Some("lc-1")),
        ],
        "no register call, no new password"
    );
}

#[tokio::test]
async fn a_drifted_credential_refused_at_login_is_recovered() {
    let (outcome, b) = run(Scripted {
        credential: unconfirmed("drifted-password-0123456789", true),
        login: [
            Err(LibreChatFailure::BadCredentials),
            Ok(Some("lc-7".into())),
        ]
        .into(),
        request_reset: [Ok(Some(
            "http://lc/reset-password?token=t7&userId=lc-7".into(),
        ))]
        .into(),
        ..Scripted::default()
    })
    .await;
    assert_eq!(outcome, Outcome::Done);
    assert!(!b.calls().iter().any(|c| matches!(c, Call::Register { .. })));
    assert!(b.calls().contains(&Call::ResetPassword {
        librechat_id: "lc-7".into(),
        token: "t7".into(),
        password: "drifted-password-0123456789".into(),
    }));
}

// ---------------------------------------------------------------------------------------------
// As a queue job handler
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn the_workflow_is_a_job_handler() {
    let backend = Backend::new(Scripted {
        register: [Err(LibreChatFailure::RateLimited(Duration::from_secs(3)))].into(),
        ..Scripted::default()
    });
    let handler: Arc<dyn JobHandler> = Arc::new(ProvisionWorkflow::new(backend.clone()));
    let job = Job {
        id: "job-1".into(),
        request: request(),
        state: JobState::Running,
        attempts: 0,
        last_error: None,
        created_at: 0,
        updated_at: 0,
        next_run_at: None,
    };
    assert!(matches!(
        handler.handle(&job).await,
        Outcome::Retry {
            spend_attempt: false,
            ..
        }
    ));
    // The next run reuses the stored password rather than minting another.
    let password = backend.stored_password().expect("stored");
    backend.script().credential = unconfirmed(&password, false);
    assert_eq!(handler.handle(&job).await, Outcome::Done);
    let stores = backend
        .calls()
        .iter()
        .filter(|c| matches!(c, Call::StorePassword { .. }))
        .count();
    assert_eq!(stores, 1);
    assert_eq!(backend.calls().last(), Some(&ready(Some("lc-1"))));
}
