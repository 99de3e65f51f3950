//! Provisioning end to end: admin API / webhook / CSV / just-in-time triggers, the Redis job
//! queue and workers, against the fake LibreChat and a real Redis.

use std::time::Duration;

use librechat_bff::{admin::hooks::sign, credentials::vault::CredentialStatus};
use provisioning::{JobState, ProvisionRequest};
use reqwest::{header, StatusCode};
use serde_json::{json, Value};
use support::{
    bff::TestBff,
    fake_idp::FakeUser,
    fake_librechat::FakeLibreChatOptions,
    wait::eventually,
    world::{get_json, http, World, ID_PASSWORD},
};
use tokio::{sync::watch, time::Instant};

const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
const HOOK_SECRET: &str = "test-hook-secret-0123456789";

fn settings(extra: &[(&'static str, String)]) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("BFF__ADMIN__TOKEN", ADMIN_TOKEN.to_string()),
        ("BFF__HOOKS__SECRET", HOOK_SECRET.to_string()),
        ("BFF__PROVISIONING__BASE_BACKOFF_SECS", "1".to_string()),
        ("BFF__PROVISIONING__MAX_BACKOFF_SECS", "2".to_string()),
    ];
    env.extend(extra.iter().cloned());
    env
}

struct Workers(watch::Sender<bool>, Vec<tokio::task::JoinHandle<()>>);

impl Workers {
    fn start(bff: &TestBff, n: usize) -> Workers {
        let (tx, rx) = watch::channel(false);
        let handles = (0..n)
            .map(|_| bff.state.provisioner.spawn_worker(rx.clone()))
            .collect();
        Workers(tx, handles)
    }

    async fn stop(self) {
        let _ = self.0.send(true);
        for h in self.1 {
            let _ = h.await;
        }
    }
}

async fn admin(
    bff: &TestBff,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = http()
        .request(method, format!("{}{path}", bff.base_url))
        .bearer_auth(ADMIN_TOKEN);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let res = req.send().await.expect("send");
    let status = res.status();
    (status, res.json().await.unwrap_or(Value::Null))
}

async fn user_state(bff: &TestBff, id: &str) -> Value {
    admin(
        bff,
        reqwest::Method::GET,
        &format!("/admin/users/{id}"),
        None,
    )
    .await
    .1
}

async fn wait_state(bff: &TestBff, id: &str, state: &str) -> Value {
    eventually(20, &format!("user {id} to be {state}"), || async {
        let v = user_state(bff, id).await;
        (v["state"] == state).then_some(v)
    })
    .await
}

fn add_identity_user(w: &World, id: i64, email: &str, groups: Vec<String>) {
    w.idp.add_user(FakeUser {
        id,
        username: format!("user{id}"),
        email: email.into(),
        password: ID_PASSWORD.into(),
        name: format!("User {id}"),
        groups,
        is_active: true,
    });
}

#[tokio::test]
async fn an_operator_registers_a_user_who_then_simply_works() {
    let w = World::new(FakeLibreChatOptions::default()).await;
    let bff = w.bff(&settings(&[])).await;
    add_identity_user(&w, 201, "ann@example.com", vec![]);

    // Only operators: no credentials → 401, a plain user → 403, the admin group → allowed.
    let res = http()
        .post(format!("{}/admin/users", bff.base_url))
        .json(&json!({"user_id": "201", "email": "ann@example.com"}))
        .send()
        .await
        .expect("send");
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    let res = http()
        .post(format!("{}/admin/users", bff.base_url))
        .bearer_auth(w.bearer(201))
        .json(&json!({"user_id": "201", "email": "ann@example.com"}))
        .send()
        .await
        .expect("send");
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    let ops_token = w.idp.mint_with_claims(json!({
        "user_id": "900", "groups": ["bff-admin"],
        "exp": time::OffsetDateTime::now_utc().unix_timestamp() + 300,
    }));
    let res = http()
        .get(format!("{}/admin/jobs?state=pending", bff.base_url))
        .bearer_auth(ops_token)
        .send()
        .await
        .expect("send");
    assert_eq!(res.status(), StatusCode::OK, "the admin group may operate");

    let (status, body) = admin(
        &bff,
        reqwest::Method::POST,
        "/admin/users",
        Some(json!({"user_id": "201", "email": "ann@example.com", "name": "Ann"})),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let job_id = body["job_id"].as_str().expect("job id").to_owned();
    // Idempotent: one pending job per user.
    let (_, again) = admin(
        &bff,
        reqwest::Method::POST,
        "/admin/users",
        Some(json!({"user_id": "201", "email": "ann@example.com"})),
    )
    .await;
    assert_eq!(again["job_id"], job_id.as_str());
    assert_eq!(again["created"], false);

    let workers = Workers::start(&bff, 1);
    let ready = wait_state(&bff, "201", "ready").await;
    workers.stop().await;
    assert!(ready["librechat_user_id"].is_string(), "{ready}");
    assert!(!ready.to_string().contains("password"), "{ready}");
    // The BFF's service account first (LibreChat's ADMIN), then Ann, once.
    assert_eq!(w.lc.register_calls(), 2);
    // LibreChat's first account (ADMIN) is the BFF's, never a product user.
    assert_eq!(
        w.lc.role_of("librechat-bff@service.invalid").as_deref(),
        Some("ADMIN")
    );
    assert_eq!(w.lc.role_of("ann@example.com").as_deref(), Some("USER"));

    let (status, body) = get_json(&bff, "/api/chat/convos", &w.bearer(201)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn a_worker_killed_after_registering_is_reclaimed_and_finishes_once() {
    let w = World::new(FakeLibreChatOptions::default()).await;
    let bff = w
        .bff(&settings(&[
            (
                "BFF__PROVISIONING__VISIBILITY_TIMEOUT_SECS",
                "1".to_string(),
            ),
            // A busy worker does not reclaim: the job's lapsed lease goes to another worker.
            ("BFF__PROVISIONING__CONCURRENCY", "1".to_string()),
        ]))
        .await;
    add_identity_user(&w, 202, "bob@example.com", vec![]);
    let queue = &bff.state.provisioner.queue;
    queue
        .enqueue(ProvisionRequest {
            user_id: "202".into(),
            email: "bob@example.com".into(),
            name: None,
            source: "test".into(),
        })
        .await
        .expect("enqueue");

    // The doomed worker takes the job, stores a password, registers... and dies before it can
    // record success (it never acks).
    let mut conn = queue.reader_connection().await.expect("conn");
    let taken = queue
        .read(&mut conn, "doomed-worker", 1, Duration::from_millis(500))
        .await
        .expect("read");
    assert_eq!(taken.len(), 1);
    let password = "Registered-by-the-doomed-worker-1";
    let record = bff.state.vault.new_record(
        "202",
        "bob@example.com",
        None,
        &librechat_bff::credentials::vault::Password::new(password),
        CredentialStatus::Provisioning,
    );
    bff.state.vault.put(&record).await.expect("vault");
    w.lc.create_user("bob@example.com", password, "bob");
    assert_eq!(w.lc.register_calls(), 0);

    // A slow LibreChat makes the rescuing run (service account, register, login) outlast the
    // 1 s lease several times, and two idle workers are reclaiming meanwhile: only the lease
    // renewal keeps them from running the job a second time.
    w.lc.set_latency(Duration::from_millis(800));
    let workers = Workers::start(&bff, 3);
    wait_state(&bff, "202", "ready").await;
    let job_id = taken[0].job.id.clone();
    let job = eventually(20, "the job to finish", || async {
        let j = queue.job(&job_id).await.ok().flatten()?;
        (!j.state.is_active()).then_some(j)
    })
    .await;
    workers.stop().await;
    w.lc.set_latency(Duration::ZERO);
    // The service account's registration, then bob's, once: a second run would register again
    // (LibreChat answers 200 for an existing email, so the account count cannot tell).
    assert_eq!(
        w.lc.register_calls(),
        2,
        "the reclaimed job registered more (or less) than once"
    );
    assert_eq!(
        w.lc.user_count(),
        2,
        "exactly one LibreChat account besides the service account"
    );
    // One uninterrupted run: a concurrent second one would have recorded its own outcome (the
    // service account's lock makes it wait and retry) and left it in the job.
    assert_eq!(job.state, JobState::Done);
    assert_eq!(
        (job.attempts, job.last_error.as_deref()),
        (0, None),
        "the job was run again"
    );
    // The doomed worker, coming back, cannot change the finished job.
    assert!(matches!(
        queue.complete(&taken[0]).await,
        Err(provisioning::QueueError::NotOwner { .. })
    ));
    assert_eq!(
        queue.job(&job_id).await.expect("job").map(|j| j.state),
        Some(JobState::Done)
    );
    let (status, _) = get_json(&bff, "/api/chat/convos", &w.bearer(202)).await;
    assert_eq!(status, StatusCode::OK, "the vault's password logs in");
}

#[tokio::test]
async fn librechat_down_is_retried_with_growing_delays_until_it_is_back() {
    let w = World::new(FakeLibreChatOptions::default()).await;
    let bff = w.bff(&settings(&[])).await;
    w.lc.go_down().await;
    let (_, body) = admin(
        &bff,
        reqwest::Method::POST,
        "/admin/users",
        Some(json!({"user_id": "203", "email": "cy@example.com"})),
    )
    .await;
    let job_id = body["job_id"].as_str().expect("job").to_owned();
    let workers = Workers::start(&bff, 1);
    let queue = bff.state.provisioner.queue.clone();
    let first = eventually(10, "a first failed attempt", || async {
        let j = queue.job(&job_id).await.ok().flatten()?;
        (j.attempts >= 1 && j.state == JobState::Delayed).then_some(j)
    })
    .await;
    let second = eventually(10, "a second failed attempt", || async {
        let j = queue.job(&job_id).await.ok().flatten()?;
        (j.attempts >= 2 && j.state == JobState::Delayed).then_some(j)
    })
    .await;
    let gap = |j: &provisioning::Job| j.next_run_at.unwrap_or(0) - j.updated_at;
    assert!(gap(&second) >= gap(&first), "delays do not shrink");
    assert!(first
        .last_error
        .as_deref()
        .unwrap_or("")
        .contains("register"));

    w.lc.come_back().await;
    wait_state(&bff, "203", "ready").await;
    workers.stop().await;
}

#[tokio::test]
async fn the_register_limiter_delays_the_job_without_spending_attempts() {
    let w = World::new(FakeLibreChatOptions {
        register_max: 1,
        register_window: Duration::from_secs(2),
        ..FakeLibreChatOptions::default()
    })
    .await;
    let bff = w.bff(&settings(&[])).await;
    let workers = Workers::start(&bff, 1);
    for (id, email) in [("204", "dee@example.com"), ("205", "eve@example.com")] {
        admin(
            &bff,
            reqwest::Method::POST,
            "/admin/users",
            Some(json!({"user_id": id, "email": email})),
        )
        .await;
    }
    let queue = bff.state.provisioner.queue.clone();
    // One of the two hits the limiter (429, Retry-After 2) and waits.
    let delayed = eventually(10, "a rate-limited job", || async {
        let list = queue.list(JobState::Delayed, 10).await.ok()?;
        list.into_iter().next()
    })
    .await;
    assert_eq!(delayed.attempts, 0, "a rate-limit wait spends no attempt");
    assert!(delayed
        .last_error
        .as_deref()
        .unwrap_or("")
        .contains("rate limit"));
    let wait = delayed.next_run_at.unwrap_or(0) - delayed.updated_at;
    assert!(
        (1..=3).contains(&wait),
        "waits the advertised delay, not the backoff: {wait}"
    );
    wait_state(&bff, "204", "ready").await;
    wait_state(&bff, "205", "ready").await;
    workers.stop().await;
    let done = queue.job(&delayed.id).await.expect("job").expect("kept");
    assert_eq!(done.attempts, 0);
}

#[tokio::test]
async fn an_existing_account_with_an_unknown_password_is_recovered_through_reset() {
    let w = World::new(FakeLibreChatOptions {
        allow_password_reset: true,
        ..FakeLibreChatOptions::default()
    })
    .await;
    let bff = w.bff(&settings(&[])).await;
    add_identity_user(&w, 206, "fay@example.com", vec![]);
    w.lc.create_user("fay@example.com", "somebody-elses-password", "Fay");
    admin(
        &bff,
        reqwest::Method::POST,
        "/admin/users",
        Some(json!({"user_id": "206", "email": "fay@example.com"})),
    )
    .await;
    let workers = Workers::start(&bff, 1);
    wait_state(&bff, "206", "ready").await;
    workers.stop().await;
    assert_eq!(
        w.lc.user_count(),
        2,
        "Fay's account and the service account"
    );
    let (status, _) = get_json(&bff, "/api/chat/convos", &w.bearer(206)).await;
    assert_eq!(status, StatusCode::OK, "the reset password is the vault's");
}

#[tokio::test]
async fn without_password_reset_an_existing_account_is_a_conflict_with_advice() {
    let w = World::new(FakeLibreChatOptions::default()).await;
    let bff = w.bff(&settings(&[])).await;
    w.lc.create_user("gus@example.com", "somebody-elses-password", "Gus");
    let (_, body) = admin(
        &bff,
        reqwest::Method::POST,
        "/admin/users",
        Some(json!({"user_id": "207", "email": "gus@example.com"})),
    )
    .await;
    let job_id = body["job_id"].as_str().expect("job").to_owned();
    let workers = Workers::start(&bff, 1);
    let status = wait_state(&bff, "207", "conflict").await;
    workers.stop().await;
    let msg = status["last_error"].as_str().unwrap_or("");
    assert!(
        msg.contains("ALLOW_PASSWORD_RESET"),
        "tells ops what to do: {msg}"
    );
    let record = bff
        .state
        .vault
        .get("207")
        .await
        .expect("vault")
        .expect("record");
    assert_eq!(record.status, CredentialStatus::Conflict);
    let job = bff
        .state
        .provisioner
        .queue
        .job(&job_id)
        .await
        .expect("job")
        .expect("job");
    assert_eq!(job.state, JobState::Dead);
}

#[tokio::test]
async fn a_validation_failure_is_dead_lettered_and_can_be_retried() {
    let w = World::new(FakeLibreChatOptions::default()).await;
    let bff = w.bff(&settings(&[])).await;
    let (status, body) = admin(
        &bff,
        reqwest::Method::POST,
        "/admin/users",
        // Valid for the BFF, refused by LibreChat's stricter validator.
        Some(json!({"user_id": "208", "email": "a!b@example.com"})),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let job_id = body["job_id"].as_str().expect("job").to_owned();
    let workers = Workers::start(&bff, 1);
    let dead = eventually(10, "the dead-lettered job", || async {
        let (_, list) = admin(&bff, reqwest::Method::GET, "/admin/jobs?state=dead", None).await;
        list["jobs"]
            .as_array()?
            .iter()
            .find(|j| j["id"] == job_id.as_str())
            .cloned()
    })
    .await;
    assert!(
        dead["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("rejected"),
        "{dead}"
    );
    assert_eq!(
        w.lc.register_calls(),
        2,
        "the service account, then the refused one"
    );

    let (status, _) = admin(
        &bff,
        reqwest::Method::POST,
        &format!("/admin/jobs/{job_id}/retry"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    eventually(10, "the retried job to run", || async {
        (w.lc.register_calls() == 3).then_some(())
    })
    .await;
    workers.stop().await;
    let (status, _) = admin(&bff, reqwest::Method::POST, "/admin/jobs/nope/retry", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn three_workers_provision_five_hundred_users_exactly_once() {
    let w = World::new(FakeLibreChatOptions {
        register_max: 100_000,
        login_max: 100_000,
        ..FakeLibreChatOptions::default()
    })
    .await;
    let bff = w.bff(&settings(&[])).await;
    let queue = bff.state.provisioner.queue.clone();
    for i in 0..500 {
        queue
            .enqueue(ProvisionRequest {
                user_id: format!("bulk{i}"),
                email: format!("bulk{i}@example.com"),
                name: None,
                source: "test".into(),
            })
            .await
            .expect("enqueue");
    }
    let workers = Workers::start(&bff, 3);
    eventually(120, "500 accounts", || async {
        // 500 users and the service account.
        (w.lc.user_count() == 501 && queue.sizes().await.ok()?.0 == 0).then_some(())
    })
    .await;
    eventually(30, "every credential ready", || async {
        for i in (0..500).step_by(50) {
            let r = bff.state.vault.get(&format!("bulk{i}")).await.ok()??;
            if r.status != CredentialStatus::Ready {
                return None;
            }
        }
        Some(())
    })
    .await;
    workers.stop().await;
    assert_eq!(w.lc.register_calls(), 501, "no user registered twice");
    let (_, _, dead) = queue.sizes().await.expect("sizes");
    assert_eq!(dead, 0);
}

async fn hook(bff: &TestBff, body: &Value, timestamp: i64, secret: &str) -> StatusCode {
    let raw = body.to_string();
    http()
        .post(format!("{}/hooks/users", bff.base_url))
        .header(header::CONTENT_TYPE, "application/json")
        .header("X-BFF-Timestamp", timestamp.to_string())
        .header(
            "X-BFF-Signature",
            sign(secret.as_bytes(), timestamp, raw.as_bytes()),
        )
        .body(raw)
        .send()
        .await
        .expect("send")
        .status()
}

#[tokio::test]
async fn the_webhook_is_signed_fresh_and_deactivation_revokes_sessions() {
    let w = World::new(FakeLibreChatOptions::default()).await;
    let bff = w.bff(&settings(&[])).await;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let created = json!({"event": "user.created", "user": {"id": 209, "email": "hal@example.com", "name": "Hal"}});
    assert_eq!(
        hook(&bff, &created, now, "wrong-secret-0123456789").await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        hook(&bff, &created, now - 3600, HOOK_SECRET).await,
        StatusCode::UNAUTHORIZED
    );
    let unsigned = http()
        .post(format!("{}/hooks/users", bff.base_url))
        .json(&created)
        .send()
        .await
        .expect("send");
    assert_eq!(unsigned.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        hook(&bff, &created, now, HOOK_SECRET).await,
        StatusCode::ACCEPTED
    );
    assert!(bff
        .state
        .provisioner
        .queue
        .active_job_of("209")
        .await
        .expect("q")
        .is_some());

    let email = w.user(&bff, 210).await;
    let mut browser = bff.client();
    assert_eq!(
        browser.login("user210", ID_PASSWORD).await.status,
        StatusCode::OK
    );
    assert_eq!(browser.get("/api/chat/convos").await.status, StatusCode::OK);
    let deactivated = json!({"event": "user.deactivated", "user": {"id": "210"}});
    assert_eq!(
        hook(&bff, &deactivated, now, HOOK_SECRET).await,
        StatusCode::OK
    );
    assert_eq!(
        browser.get("/auth/me").await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(w.lc.logout_calls(), 1, "the LibreChat login is ended too");
    assert_eq!(w.lc.session_count(&email), 0);
    // Until registered again, the (still unexpired) identity JWT gets no LibreChat access.
    let bearer = w.bearer(210);
    let (status, body) = get_json(&bff, "/api/chat/convos", &bearer).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body["error"], "account_disabled");

    let again = json!({"event": "user.created", "user": {"id": "210", "email": email}});
    assert_eq!(
        hook(&bff, &again, now, HOOK_SECRET).await,
        StatusCode::ACCEPTED
    );
    let workers = Workers::start(&bff, 1);
    wait_state(&bff, "210", "ready").await;
    workers.stop().await;
    assert_eq!(
        get_json(&bff, "/api/chat/convos", &bearer).await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn csv_import_migrates_python_encrypted_passwords_without_registering() {
    let fx: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/fernet/python-fernet.json"
        ))
        .expect("fixture"),
    )
    .expect("json");
    let python_key = fx["keys"][0].as_str().expect("key").to_owned();
    let token = fx["tokens"][0]["token"].as_str().expect("token").to_owned();
    let plaintext = fx["tokens"][0]["plaintext"]
        .as_str()
        .expect("plain")
        .to_owned();

    let w = World::new(FakeLibreChatOptions::default()).await;
    let keys = format!("{},{python_key}", w.key);
    let bff = w
        .bff(&settings(&[("BFF__CRYPTO__FERNET_KEYS", keys)]))
        .await;
    add_identity_user(&w, 211, "ida@example.com", vec![]);
    w.lc.create_user("ida@example.com", &plaintext, "Ida");

    let csv = format!(
        "user_id,email,name,librechat_password_encrypted\n\
         211,ida@example.com,Ida,{token}\n\
         212,jan@example.com,Jan,\n\
         213,not-an-email,X,\n\
         214,kim@example.com,Kim,gAAAAAnot-a-token\n"
    );
    let report = librechat_bff::admin::ops::import_csv(&bff.state.ops, csv.as_bytes())
        .await
        .expect("import");
    assert_eq!((report.migrated, report.enqueued), (1, 1));
    assert_eq!(report.rejected.len(), 2, "{:?}", report.rejected);
    assert!(report.rejected[0].contains("line 4"));
    let record = bff
        .state
        .vault
        .get("211")
        .await
        .expect("vault")
        .expect("record");
    assert_eq!(record.status, CredentialStatus::Ready);

    let (status, body) = get_json(&bff, "/api/chat/convos", &w.bearer(211)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(w.lc.register_calls(), 0, "LibreChat's register untouched");
}

#[tokio::test]
async fn a_user_without_an_account_is_provisioned_just_in_time() {
    let w = World::new(FakeLibreChatOptions::default()).await;
    let bff = w.bff(&settings(&[])).await;
    add_identity_user(&w, 215, "lee@example.com", vec![]);
    let bearer = w.bearer(215);
    let res = http()
        .get(format!("{}/api/chat/convos", bff.base_url))
        .bearer_auth(&bearer)
        .send()
        .await
        .expect("send");
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    // A job just queued: retry soon (a delayed job answers its real next run).
    assert_eq!(res.headers()[header::RETRY_AFTER], "2");
    let body: Value = res.json().await.expect("json");
    assert_eq!(body["error"], "provisioning_pending");
    assert!(bff
        .state
        .provisioner
        .queue
        .active_job_of("215")
        .await
        .expect("q")
        .is_some());

    // A cookie sign-in does not wait for provisioning, but queues it.
    add_identity_user(&w, 216, "max@example.com", vec![]);
    let mut browser = bff.client();
    assert_eq!(
        browser.login("user216", ID_PASSWORD).await.status,
        StatusCode::OK
    );
    let queue = bff.state.provisioner.queue.clone();
    eventually(10, "the sign-in's job", || async {
        queue.active_job_of("216").await.ok().flatten()
    })
    .await;

    let workers = Workers::start(&bff, 1);
    wait_state(&bff, "215", "ready").await;
    wait_state(&bff, "216", "ready").await;
    workers.stop().await;
    assert_eq!(
        get_json(&bff, "/api/chat/convos", &bearer).await.0,
        StatusCode::OK
    );
    assert_eq!(browser.get("/api/chat/convos").await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_wrong_admin_token_is_403_and_none_is_401() {
    let w = World::new(FakeLibreChatOptions::default()).await;
    let bff = w.bff(&settings(&[])).await;
    let url = format!("{}/admin/jobs?state=dead", bff.base_url);
    let none = http().get(&url).send().await.expect("send");
    assert_eq!(none.status(), StatusCode::UNAUTHORIZED);
    let wrong = http()
        .get(&url)
        .bearer_auth("not-the-admin-token-at-all")
        .send()
        .await
        .expect("send");
    assert_eq!(wrong.status(), StatusCode::FORBIDDEN);
    let right = http()
        .get(&url)
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("send");
    assert_eq!(right.status(), StatusCode::OK);
    let bad_state = http()
        .get(format!("{}/admin/jobs?state=nope", bff.base_url))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("send");
    assert_eq!(bad_state.status(), StatusCode::BAD_REQUEST);
}

// ---------------------------------------------------------------------------------------------
// Security: one LibreChat account per identity user, deactivation that sticks
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_shared_email_never_hands_one_users_librechat_account_to_another() {
    let w = World::new(FakeLibreChatOptions {
        // The recovery path an attacker would have ridden: reset links returned to the BFF.
        allow_password_reset: true,
        ..FakeLibreChatOptions::default()
    })
    .await;
    let bff = w.bff(&settings(&[])).await;
    // The victim's account predates email bindings (seeded straight into the vault): the
    // binding index is built from existing records.
    w.user(&bff, 401).await;
    // The attacker's identity account carries the same address, spelled differently.
    add_identity_user(&w, 402, "  User401@Example.COM ", vec![]);
    let victim = w.bearer(401);
    assert_eq!(
        get_json(&bff, "/api/chat/convos", &victim).await.0,
        StatusCode::OK
    );

    let workers = Workers::start(&bff, 1);
    let attacker = w.bearer(402);
    let body = eventually(20, "the attacker to be refused", || async {
        let (status, body) = get_json(&bff, "/api/chat/convos", &attacker).await;
        assert_ne!(status, StatusCode::OK, "the attacker got in: {body}");
        (status == StatusCode::CONFLICT).then_some(body)
    })
    .await;
    assert_eq!(body["error"], "account_conflict", "{body}");
    // Ops get the same answer, naming both users.
    let (status, body) = admin(
        &bff,
        reqwest::Method::POST,
        "/admin/users",
        Some(json!({"user_id": "402", "email": "USER401@example.com"})),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"], "email_conflict");
    let msg = body["message"].as_str().unwrap_or("");
    assert!(msg.contains("402") && msg.contains("401"), "{msg}");
    let state = user_state(&bff, "402").await;
    assert_eq!(state["credential_status"], "conflict", "{state}");
    workers.stop().await;

    assert_eq!(w.lc.calls_to("/api/auth/requestPasswordReset"), 0);
    assert_eq!(w.lc.calls_to("/api/auth/resetPassword"), 0);
    assert_eq!(
        w.lc.register_calls(),
        0,
        "nothing registered for the attacker"
    );
    assert_eq!(
        w.lc.user_count(),
        1,
        "still one account for that address: {:?}",
        w.lc.user_id("user401@example.com")
    );
    // The victim keeps their account and the vault's password still logs in.
    bff.state
        .tokens
        .sign_out("401", bff.state.provisioner.caller())
        .await
        .expect("sign out");
    let (status, body) = get_json(&bff, "/api/chat/convos", &victim).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let record = bff
        .state
        .vault
        .get("401")
        .await
        .expect("vault")
        .expect("record");
    assert_eq!(record.status, CredentialStatus::Ready);
}

#[tokio::test]
async fn a_deactivation_sticks_while_the_users_job_is_queued_or_running() {
    let w = World::new(FakeLibreChatOptions::default()).await;
    let bff = w.bff(&settings(&[])).await;
    let queue = bff.state.provisioner.queue.clone();

    // Queued: deactivated before any worker runs; the job is withdrawn.
    add_identity_user(&w, 411, "queued@example.com", vec![]);
    let (_, body) = admin(
        &bff,
        reqwest::Method::POST,
        "/admin/users",
        Some(json!({"user_id": "411", "email": "queued@example.com"})),
    )
    .await;
    let queued_job = body["job_id"].as_str().expect("job").to_owned();
    let (status, body) = admin(
        &bff,
        reqwest::Method::POST,
        "/admin/users/411/deactivate",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["cancelled_job"], queued_job.as_str());

    // Running: deactivated (by the identity service's webhook) while a worker is mid-job.
    add_identity_user(&w, 412, "running@example.com", vec![]);
    let (_, body) = admin(
        &bff,
        reqwest::Method::POST,
        "/admin/users",
        Some(json!({"user_id": "412", "email": "running@example.com"})),
    )
    .await;
    let running_job = body["job_id"].as_str().expect("job").to_owned();
    w.lc.set_latency(Duration::from_millis(800));
    let workers = Workers::start(&bff, 2);
    eventually(10, "the job to be running", || async {
        let j = queue.job(&running_job).await.ok()??;
        (j.state == JobState::Running).then_some(())
    })
    .await;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let event = json!({"event": "user.updated", "user": {"id": 412, "email": "running@example.com", "is_active": false}});
    assert_eq!(hook(&bff, &event, now, HOOK_SECRET).await, StatusCode::OK);
    // The worker finishes its LibreChat calls; whatever it records, the user stays disabled.
    eventually(20, "the running job to end", || async {
        let j = queue.job(&running_job).await.ok()??;
        (!j.state.is_active()).then_some(())
    })
    .await;
    w.lc.set_latency(Duration::ZERO);
    // Give the queued job every chance to run (it must not).
    eventually(10, "the queue to drain", || async {
        let (depth, delayed, _) = queue.sizes().await.ok()?;
        (depth == 0 && delayed == 0).then_some(())
    })
    .await;
    workers.stop().await;

    for (id, job) in [("411", &queued_job), ("412", &running_job)] {
        let record = bff.state.vault.get(id).await.expect("vault").expect("kept");
        assert_eq!(record.status, CredentialStatus::Disabled, "user {id}");
        let j = queue.job(job).await.expect("job").expect("kept");
        assert_eq!(j.state, JobState::Cancelled, "job of {id}");
        let bearer = w.bearer(id.parse().expect("id"));
        let (status, body) = get_json(&bff, "/api/chat/convos", &bearer).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "user {id}: {body}");
        assert_eq!(body["error"], "account_disabled");
    }
    assert_eq!(w.lc.role_of("queued@example.com"), None, "never registered");

    // An ordinary update does not bring a deactivated user back; an explicit registration does.
    let event = json!({"event": "user.updated", "user": {"id": 411, "email": "queued@example.com", "name": "Q"}});
    assert_eq!(
        hook(&bff, &event, now, HOOK_SECRET).await,
        StatusCode::ACCEPTED
    );
    let record = bff
        .state
        .vault
        .get("411")
        .await
        .expect("vault")
        .expect("kept");
    assert_eq!(record.status, CredentialStatus::Disabled);
    let (status, _) = admin(
        &bff,
        reqwest::Method::POST,
        "/admin/users",
        Some(json!({"user_id": "412", "email": "running@example.com"})),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let workers = Workers::start(&bff, 1);
    wait_state(&bff, "412", "ready").await;
    workers.stop().await;
    assert_eq!(
        get_json(&bff, "/api/chat/convos", &w.bearer(412)).await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn every_replica_stops_serving_a_deactivated_user_within_a_second() {
    let w = World::new(FakeLibreChatOptions::default()).await;
    let a = w.bff(&settings(&[])).await;
    let b = w.bff(&settings(&[])).await;
    w.user(&a, 421).await;
    let bearer = w.bearer(421);
    // Replica B holds the user's LibreChat token in memory: its warm path asks no one.
    for _ in 0..2 {
        assert_eq!(
            get_json(&b, "/api/chat/convos", &bearer).await.0,
            StatusCode::OK
        );
    }
    let (status, _) = admin(
        &a,
        reqwest::Method::POST,
        "/admin/users/421/deactivate",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let deactivated = Instant::now();
    let status = loop {
        let (status, _) = get_json(&b, "/api/chat/convos", &bearer).await;
        if status != StatusCode::OK || deactivated.elapsed() > Duration::from_secs(3) {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let took = deactivated.elapsed();
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(
        took < Duration::from_secs(1),
        "replica B served for {took:?}"
    );
}

#[tokio::test]
async fn ops_and_webhook_input_with_control_characters_or_bad_emails_is_refused() {
    let w = World::new(FakeLibreChatOptions::default()).await;
    let bff = w.bff(&settings(&[])).await;
    for body in [
        json!({"user_id": "430", "email": "a@example.com\r\nBcc: x@evil.test"}),
        json!({"user_id": "430", "email": "a b@example.com"}),
        json!({"user_id": "430", "email": "a@example"}),
        json!({"user_id": "43\u{0}0", "email": "a@example.com"}),
        json!({"user_id": "430", "email": "a@example.com", "name": "Ann\nAdmin"}),
        json!({"user_id": "x".repeat(300), "email": "a@example.com"}),
    ] {
        let (status, reply) = admin(
            &bff,
            reqwest::Method::POST,
            "/admin/users",
            Some(body.clone()),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body} → {reply}");
        assert_eq!(reply["error"], "bad_request");
    }
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let event = json!({"event": "user.created", "user": {"id": 431, "email": "b@example.com\r\n"}});
    assert_eq!(
        hook(&bff, &event, now, HOOK_SECRET).await,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        bff.state.provisioner.queue.sizes().await.expect("sizes").0,
        0
    );
}

#[tokio::test]
async fn a_replayed_or_out_of_order_webhook_cannot_undo_a_deactivation() {
    let w = World::new(FakeLibreChatOptions::default()).await;
    let bff = w.bff(&settings(&[])).await;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let created =
        json!({"event": "user.created", "user": {"id": 440, "email": "replay@example.com"}});
    assert_eq!(
        hook(&bff, &created, now - 10, HOOK_SECRET).await,
        StatusCode::ACCEPTED
    );
    let deactivated = json!({"event": "user.deactivated", "user": {"id": 440}});
    assert_eq!(
        hook(&bff, &deactivated, now - 5, HOOK_SECRET).await,
        StatusCode::OK
    );

    // The captured creation, byte for byte (same signature), within the tolerance window.
    assert_eq!(
        hook(&bff, &created, now - 10, HOOK_SECRET).await,
        StatusCode::OK
    );
    // An older event, validly signed but delivered late.
    let late = json!({"event": "user.created", "user": {"id": 440, "email": "replay@example.com", "name": "Late"}});
    assert_eq!(
        hook(&bff, &late, now - 8, HOOK_SECRET).await,
        StatusCode::OK
    );
    let record = bff
        .state
        .vault
        .get("440")
        .await
        .expect("vault")
        .expect("tombstone");
    assert_eq!(record.status, CredentialStatus::Disabled);

    // A newer registration does lift it.
    assert_eq!(
        hook(&bff, &created, now, HOOK_SECRET).await,
        StatusCode::ACCEPTED
    );
    assert!(
        bff.state.vault.get("440").await.expect("vault").is_none(),
        "tombstone lifted"
    );
}

#[tokio::test]
async fn small_bodies_that_never_finish_are_408_not_a_held_handler() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let w = World::new(FakeLibreChatOptions::default()).await;
    let bff = w
        .bff(&settings(&[(
            "BFF__SERVER__REQUEST_BODY_IDLE_TIMEOUT_SECS",
            "1".to_string(),
        )]))
        .await;
    let addr = bff.base_url.trim_start_matches("http://").to_owned();
    for path in ["/hooks/users", "/admin/users", "/auth/login"] {
        let mut conn = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connect");
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: bff\r\nContent-Type: application/json\r\n\
             Authorization: Bearer {ADMIN_TOKEN}\r\nContent-Length: 100\r\n\r\n{{\"a\""
        );
        conn.write_all(head.as_bytes()).await.expect("write");
        let started = Instant::now();
        let mut reply = vec![0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut reply))
            .await
            .expect("an answer before the test's own limit")
            .expect("read");
        let text = String::from_utf8_lossy(&reply[..n]);
        assert!(text.starts_with("HTTP/1.1 408"), "{path}: {text}");
        assert!(text.contains("request_timeout"), "{path}: {text}");
        assert!(started.elapsed() < Duration::from_secs(5), "{path}");
    }
}

#[tokio::test]
async fn a_deactivated_user_opens_no_new_session() {
    let w = World::new(FakeLibreChatOptions::default()).await;
    let bff = w.bff(&settings(&[])).await;
    w.user(&bff, 450).await;
    let (status, _) = admin(
        &bff,
        reqwest::Method::POST,
        "/admin/users/450/deactivate",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    // The identity service still signs them in (its deactivation may lag, or its token live on).
    let mut browser = bff.client();
    let res = browser.login("user450", ID_PASSWORD).await;
    assert_eq!(res.status, StatusCode::FORBIDDEN, "{}", res.body);
    assert_eq!(res.body["error"], "account_disabled");
    assert!(browser.cookie.is_none());
    let res = browser
        .send(
            reqwest::Method::POST,
            "/auth/session",
            None,
            Some(&w.bearer(450)),
        )
        .await;
    assert_eq!(res.status, StatusCode::FORBIDDEN, "{}", res.body);
    assert!(browser.cookie.is_none());
}
