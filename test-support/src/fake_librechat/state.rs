//! In-memory state: users, sessions, conversations, messages, files.

use super::*;

pub(super) struct Shared {
    pub(super) opts: Mutex<FakeLibreChatOptions>,
    pub(super) base_url: String,
    pub(super) access_secret: Vec<u8>,
    pub(super) refresh_secret: Vec<u8>,
    pub(super) oid: ObjectIdGen,
    pub(super) db: Mutex<Db>,
    pub(super) limits: Mutex<Limiters>,
    pub(super) bans: Mutex<Bans>,
    pub(super) jobs: Mutex<HashMap<String, Arc<Job>>>,
    pub(super) pending_gate: Mutex<Option<Arc<GateShared>>>,
    /// Auth answers to hold, by path (see `FakeLibreChat::hold_next_auth`).
    pub(super) auth_gates: Mutex<HashMap<String, Arc<GateShared>>>,
    /// Canned answers, by path (see `FakeLibreChat::answer_with`).
    pub(super) canned: Mutex<HashMap<String, CannedAnswer>>,
    pub(super) latency: Mutex<Duration>,
    pub(super) requests: Mutex<Vec<RecordedRequest>>,
    pub(super) uploads: Mutex<Vec<RecordedUpload>>,
    pub(super) login_calls: AtomicUsize,
    pub(super) refresh_calls: AtomicUsize,
    pub(super) register_calls: AtomicUsize,
    pub(super) logout_calls: AtomicUsize,
    /// Every access token is refused (401), as for a user LibreChat no longer accepts.
    pub(super) reject_tokens: std::sync::atomic::AtomicBool,
}

impl Shared {
    pub(super) fn new(opts: FakeLibreChatOptions, base_url: String) -> Self {
        Self {
            limits: Mutex::new(Limiters::new(&opts)),
            opts: Mutex::new(opts),
            base_url,
            access_secret: random_bytes(32),
            refresh_secret: random_bytes(32),
            oid: ObjectIdGen::new(),
            db: Mutex::new(Db::default()),
            bans: Mutex::new(Bans::default()),
            jobs: Mutex::new(HashMap::new()),
            pending_gate: Mutex::new(None),
            auth_gates: Mutex::new(HashMap::new()),
            canned: Mutex::new(HashMap::new()),
            latency: Mutex::new(Duration::ZERO),
            requests: Mutex::new(Vec::new()),
            uploads: Mutex::new(Vec::new()),
            login_calls: AtomicUsize::new(0),
            refresh_calls: AtomicUsize::new(0),
            register_calls: AtomicUsize::new(0),
            logout_calls: AtomicUsize::new(0),
            reject_tokens: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub(super) fn opts(&self) -> FakeLibreChatOptions {
        lock(&self.opts).clone()
    }

    pub(super) fn remove_job_if_same(&self, job: &Arc<Job>) {
        let mut jobs = lock(&self.jobs);
        if jobs
            .get(&job.stream_id)
            .is_some_and(|j| Arc::ptr_eq(j, job))
        {
            jobs.remove(&job.stream_id);
        }
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread must not turn every later request into a second panic.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[derive(Clone, Debug)]
pub(super) struct User {
    pub(super) id: String,
    pub(super) email: String,
    pub(super) username: String,
    pub(super) name: String,
    pub(super) password_hash: String,
    pub(super) role: String,
    personalization_id: String,
    pub(super) created_at: String,
    pub(super) updated_at: String,
}

#[derive(Clone, Copy)]
pub(super) enum UserView {
    /// Login answer: the DB document plus `id`.
    Login,
    /// Refresh answer: the lean DB document, `_id` but no `id`.
    Refresh,
    /// `GET /api/user`: whitelisted fields with both `_id` and `id`, no `refreshToken`.
    Profile,
}

impl User {
    pub(super) fn to_json(&self, view: UserView) -> Value {
        let mut v = json!({
            "_id": self.id,
            "name": self.name,
            "username": self.username,
            "email": self.email,
            "emailVerified": true,
            "avatar": null,
            "provider": "local",
            "role": self.role,
            "plugins": [],
            "twoFactorEnabled": false,
            "termsAccepted": false,
            "personalization": {"memories": true, "_id": self.personalization_id},
            "favorites": [],
            "skillStates": {},
            "createdAt": self.created_at,
            "updatedAt": self.updated_at,
        });
        if let Some(obj) = v.as_object_mut() {
            match view {
                UserView::Login => {
                    obj.insert("refreshToken".into(), json!([]));
                    obj.insert("id".into(), json!(self.id));
                }
                UserView::Refresh => {
                    obj.insert("refreshToken".into(), json!([]));
                }
                UserView::Profile => {
                    obj.insert("id".into(), json!(self.id));
                }
            }
        }
        v
    }
}

pub(super) struct Session {
    pub(super) id: String,
    pub(super) user_id: String,
    pub(super) refresh_hash: String,
    pub(super) expiration_ms: u64,
}

pub(super) struct ResetToken {
    pub(super) user_id: String,
    pub(super) token_hash: String,
    pub(super) expires_ms: u64,
}

pub(super) struct Convo {
    pub(super) user_id: String,
    /// The conversation document as LibreChat stores it (without internal-only fields).
    pub(super) doc: Map<String, Value>,
}

impl Convo {
    pub(super) fn id(&self) -> &str {
        self.doc
            .get("conversationId")
            .and_then(Value::as_str)
            .unwrap_or("")
    }

    pub(super) fn list_item(&self) -> Value {
        let mut item = Map::new();
        for key in [
            "_id",
            "conversationId",
            "endpoint",
            "title",
            "createdAt",
            "updatedAt",
            "user",
            "model",
            "agent_id",
            "chatProjectId",
        ] {
            if let Some(v) = self.doc.get(key) {
                item.insert(key.into(), v.clone());
            }
        }
        Value::Object(item)
    }
}

pub(super) struct StoredMessage {
    pub(super) conversation_id: String,
    /// Fields as `GET /api/messages/:id` returns them (`_id`, `__v`, `user` excluded).
    pub(super) doc: Value,
}

pub(super) struct StoredFile {
    pub(super) user_id: String,
    pub(super) doc: Map<String, Value>,
}

#[derive(Default)]
pub(super) struct Db {
    pub(super) users: Vec<User>,
    pub(super) sessions: Vec<Session>,
    pub(super) reset_tokens: Vec<ResetToken>,
    pub(super) convos: Vec<Convo>,
    pub(super) messages: Vec<StoredMessage>,
    pub(super) files: Vec<StoredFile>,
}

impl Db {
    pub(super) fn user_by_email(&self, email: &str) -> Option<&User> {
        let email = email.trim().to_lowercase();
        self.users.iter().find(|u| u.email == email)
    }

    pub(super) fn user_by_email_mut(&mut self, email: &str) -> Option<&mut User> {
        let email = email.trim().to_lowercase();
        self.users.iter_mut().find(|u| u.email == email)
    }

    pub(super) fn user_by_id(&self, id: &str) -> Option<&User> {
        self.users.iter().find(|u| u.id == id)
    }

    pub(super) fn insert_user(
        &mut self,
        oid: &ObjectIdGen,
        email: &str,
        username: &str,
        name: &str,
        password: &str,
    ) -> String {
        let now = iso(now_ms());
        let personalization_id = oid.next();
        let id = oid.next();
        // The first account on a LibreChat instance becomes its admin.
        let role = if self.users.is_empty() {
            "ADMIN"
        } else {
            "USER"
        };
        self.users.push(User {
            id: id.clone(),
            email: email.trim().to_lowercase(),
            username: username.to_lowercase(),
            name: name.to_owned(),
            password_hash: hash_password(password),
            role: role.into(),
            personalization_id,
            created_at: now.clone(),
            updated_at: now,
        });
        id
    }

    pub(super) fn convo(&self, conversation_id: &str) -> Option<&Convo> {
        self.convos.iter().find(|c| c.id() == conversation_id)
    }

    pub(super) fn convo_mut(&mut self, conversation_id: &str) -> Option<&mut Convo> {
        self.convos.iter_mut().find(|c| c.id() == conversation_id)
    }
}

/// Mongo-style 24-hex ids: seconds, a per-instance random part, a counter.
pub(super) struct ObjectIdGen {
    pub(super) random: [u8; 5],
    pub(super) counter: AtomicU32,
}

impl ObjectIdGen {
    pub(super) fn new() -> Self {
        Self {
            random: rand::random(),
            counter: AtomicU32::new(rand::random::<u32>() & 0x00ff_ffff),
        }
    }

    pub(super) fn next(&self) -> String {
        let secs = (now_ms() / 1000) as u32;
        let count = self.counter.fetch_add(1, Ordering::SeqCst) & 0x00ff_ffff;
        format!("{secs:08x}{}{count:06x}", hex(&self.random))
    }
}
