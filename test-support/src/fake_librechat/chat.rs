//! Agents: chat, resumable SSE streams, abort.

use super::*;

pub(super) struct GateShared {
    pub(super) released: watch::Sender<bool>,
    pub(super) reached: watch::Sender<bool>,
}

/// One generation. It runs on its own task, independent of any HTTP connection; frames are kept
/// so the first subscriber gets everything produced before it arrived. The job disappears once a
/// subscriber has been sent the final frame, or `JOB_LINGER` after it finished unobserved (the
/// real server's grace for a late subscriber is not recorded; a later GET gets 404).
pub(super) struct Job {
    pub(super) stream_id: String,
    pub(super) user_id: String,
    created_at_ms: u64,
    pub(super) gate: Option<Arc<GateShared>>,
    pub(super) abort: watch::Sender<bool>,
    progress: watch::Sender<u64>,
    pub(super) inner: Mutex<JobInner>,
}

pub(super) struct JobInner {
    pub(super) frames: Vec<Bytes>,
    pub(super) done: bool,
    pub(super) subscribed: bool,
    aggregated: String,
    run_step: Option<Value>,
    pub(super) user_message: Value,
    response_message_id: String,
    pub(super) sender: String,
    pub(super) model: String,
}

impl Job {
    pub(super) fn push(&self, data: &Value, done: bool) {
        {
            let mut inner = lock(&self.inner);
            inner.frames.push(Bytes::from(sse_frame("message", data)));
            inner.done |= done;
        }
        self.progress.send_modify(|n| *n += 1);
    }

    fn resume_state(&self) -> Value {
        let inner = lock(&self.inner);
        let user = &inner.user_message;
        json!({
            "runSteps": inner.run_step.iter().cloned().collect::<Vec<_>>(),
            "aggregatedContent": [{"type": "text", "text": inner.aggregated}],
            "userMessage": {
                "messageId": user.get("messageId"),
                "parentMessageId": user.get("parentMessageId"),
                "conversationId": user.get("conversationId"),
                "text": user.get("text"),
            },
            "responseMessageId": inner.response_message_id,
            "conversationId": self.stream_id,
            "sender": inner.sender,
            "model": inner.model,
            "contextUsage": context_usage(&inner.response_message_id, &inner.sender, &inner.model),
        })
    }
}

pub(super) struct Turn {
    pub(super) user_id: String,
    pub(super) conversation_id: String,
    pub(super) endpoint: String,
    pub(super) model: String,
    pub(super) text: String,
    pub(super) user_message: Value,
    response_message_id: String,
    /// Set on the first turn of a new conversation: the title generated for it.
    pub(super) title: Option<String>,
    gap: Duration,
}

pub(super) async fn agents(
    shared: &Arc<Shared>,
    ctx: &Ctx,
    user: &User,
    tail: &[&str],
) -> Response<Body> {
    match (ctx.method.clone(), tail) {
        (Method::GET, []) => json_reply(
            StatusCode::OK,
            &json!({"object": "list", "data": [], "first_id": null, "last_id": null,
                    "has_more": false, "after": null}),
        ),
        (Method::POST, ["chat", "abort"]) => abort_chat(shared, ctx, user).await,
        (Method::GET, ["chat", "active"]) => {
            let ids: Vec<String> = lock(&shared.jobs)
                .values()
                .filter(|j| j.user_id == user.id && !lock(&j.inner).done)
                .map(|j| j.stream_id.clone())
                .collect();
            json_reply(StatusCode::OK, &json!({ "activeJobIds": ids }))
        }
        (Method::GET, ["chat", "status", conversation_id]) => {
            let job = lock(&shared.jobs).get(*conversation_id).cloned();
            match job.filter(|j| j.user_id == user.id && !lock(&j.inner).done) {
                Some(job) => {
                    let state = job.resume_state();
                    json_reply(
                        StatusCode::OK,
                        &json!({
                            "active": true,
                            "streamId": job.stream_id,
                            "status": "running",
                            "aggregatedContent": state["aggregatedContent"].clone(),
                            "createdAt": job.created_at_ms,
                            "resumeState": state,
                        }),
                    )
                }
                None => json_reply(StatusCode::OK, &json!({"active": false})),
            }
        }
        (Method::GET, ["chat", "stream", stream_id]) => open_stream(shared, ctx, user, stream_id),
        (Method::POST, ["chat", endpoint]) => start_chat(shared, ctx, user, endpoint),
        _ => endpoint_not_found(),
    }
}

fn start_chat(shared: &Arc<Shared>, ctx: &Ctx, user: &User, endpoint: &str) -> Response<Body> {
    let body = ctx.body();
    let text = body.get("text").and_then(Value::as_str).map(str::to_owned);
    let endpoint_type = body.get("endpointType").and_then(Value::as_str);
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    // Turn errors come back as HTTP 200 with an SSE-formatted `event: error` body (handleError),
    // not as 4xx. The exact wording is UNCONFIRMED.
    let turn_error =
        |msg: &str| raw_chunked(StatusCode::OK, sse_frame("error", &json!({"text": msg})));
    let Some(text) = text else {
        return turn_error("Prompt is required.");
    };
    if endpoint != "agents" && endpoint_type.is_none() {
        return turn_error("Error building endpoint option");
    }
    if endpoint == FAKE_ENDPOINT && model != FAKE_MODEL {
        return turn_error(&format!("Model {model} not found for endpoint {endpoint}"));
    }
    let conversation_id = match body.get("conversationId").and_then(Value::as_str) {
        Some(id) if id != "new" && !id.is_empty() => id.to_owned(),
        _ => uuid4(),
    };
    let parent_message_id = body
        .get("parentMessageId")
        .and_then(Value::as_str)
        .unwrap_or(NO_PARENT)
        .to_owned();
    let now = now_ms();
    let agent_id = format!("{endpoint}__{model}___{endpoint}");
    let mut db = lock(&shared.db);
    let is_new = match db.convo(&conversation_id) {
        Some(c) if c.user_id != user.id => {
            // UNCONFIRMED body: validateConvoAccess refuses someone else's conversation.
            return json_reply(
                StatusCode::FORBIDDEN,
                &json!({"message": "You do not have access to this conversation"}),
            );
        }
        Some(_) => false,
        None => true,
    };
    if is_new {
        let mut doc = Map::new();
        doc.insert("_id".into(), json!(shared.oid.next()));
        doc.insert("conversationId".into(), json!(conversation_id));
        doc.insert("user".into(), json!(user.id));
        doc.insert("endpoint".into(), json!(endpoint));
        doc.insert("endpointType".into(), json!(endpoint_type));
        doc.insert("agent_id".into(), json!(agent_id));
        doc.insert("resendFiles".into(), json!(true));
        doc.insert("maxContextTokens".into(), json!(30400));
        doc.insert("model".into(), json!(model));
        doc.insert("messages".into(), json!([]));
        doc.insert("updatedAt".into(), json!(iso(now)));
        doc.insert("createdAt".into(), json!(iso(now)));
        doc.insert("__v".into(), json!(0));
        doc.insert("title".into(), json!("New Chat"));
        doc.insert("isTemporary".into(), json!(false));
        doc.insert("isArchived".into(), json!(false));
        doc.insert("tags".into(), json!([]));
        doc.insert("chatProjectId".into(), Value::Null);
        doc.insert("files".into(), json!([]));
        db.convos.push(Convo {
            user_id: user.id.clone(),
            doc,
        });
    }
    // The client's messageId is a placeholder; the stored id is the server's.
    let message_id = uuid4();
    let token_count = text.split_whitespace().count().max(1) * 2;
    let user_message = json!({
        "messageId": message_id,
        "parentMessageId": parent_message_id,
        "conversationId": conversation_id,
        "sender": "User",
        "text": text,
        "isCreatedByUser": true,
        "tokenCount": token_count,
    });
    let stored = json!({
        "messageId": message_id,
        "updatedAt": iso(now),
        "unfinished": false,
        "endpoint": endpoint,
        "tokenCount": token_count,
        "isCreatedByUser": true,
        "text": text,
        "sender": "User",
        "conversationId": conversation_id,
        "parentMessageId": parent_message_id,
        "createdAt": iso(now),
        "model": null,
        "isTemporary": false,
        "error": false,
    });
    let object_id = shared.oid.next();
    if let Some(convo) = db.convo_mut(&conversation_id) {
        if let Some(Value::Array(ids)) = convo.doc.get_mut("messages") {
            ids.push(json!(object_id));
        }
    }
    db.messages.push(StoredMessage {
        conversation_id: conversation_id.clone(),
        doc: stored,
    });
    drop(db);

    let response_message_id = uuid4();
    let job = Arc::new(Job {
        stream_id: conversation_id.clone(),
        user_id: user.id.clone(),
        created_at_ms: now,
        gate: lock(&shared.pending_gate).take(),
        abort: watch::channel(false).0,
        progress: watch::channel(0).0,
        inner: Mutex::new(JobInner {
            frames: Vec::new(),
            done: false,
            subscribed: false,
            aggregated: String::new(),
            run_step: None,
            user_message: user_message.clone(),
            response_message_id: response_message_id.clone(),
            sender: endpoint.to_owned(),
            model: model.clone(),
        }),
    });
    // streamId == conversationId: a new turn in a conversation replaces a still-running one.
    if let Some(previous) = lock(&shared.jobs).insert(conversation_id.clone(), job.clone()) {
        previous.abort.send_replace(true);
    }
    let title = is_new.then(|| {
        let words: Vec<&str> = text.split_whitespace().take(4).collect();
        format!("Fake Title About {}", words.join(" "))
    });
    let turn = Turn {
        user_id: user.id.clone(),
        conversation_id: conversation_id.clone(),
        endpoint: endpoint.to_owned(),
        model,
        text,
        user_message,
        response_message_id,
        title,
        gap: shared.opts().sse_frame_interval,
    };
    tokio::spawn(generate(shared.clone(), job, turn));
    json_reply(
        StatusCode::OK,
        &json!({"streamId": conversation_id, "conversationId": conversation_id,
                "status": "started"}),
    )
}

/// Waits `gap`, or less if the job is aborted meanwhile; true when aborted.
async fn pause(abort: &mut watch::Receiver<bool>, gap: Duration) -> bool {
    if *abort.borrow() {
        return true;
    }
    let slept = tokio::select! {
        _ = tokio::time::sleep(gap) => true,
        _ = abort.wait_for(|a| *a) => false,
    };
    !slept || *abort.borrow()
}

async fn generate(shared: Arc<Shared>, job: Arc<Job>, turn: Turn) {
    let mut abort = job.abort.subscribe();
    let run_id = turn.response_message_id.clone();
    let step_id = format!("step_{}", &uuid4().replace('-', "")[..21]);
    let started = now_ms();

    job.push(
        &json!({"created": true, "message": turn.user_message, "streamId": job.stream_id}),
        false,
    );
    let mut aborted = pause(&mut abort, turn.gap).await;
    if !aborted {
        job.push(
            &json!({"event": "on_context_usage",
                    "data": context_usage(&run_id, &turn.endpoint, &turn.model)}),
            false,
        );
        aborted = pause(&mut abort, turn.gap).await;
    }
    if !aborted {
        let step = json!({
            "stepIndex": 0,
            "id": step_id,
            "type": "message_creation",
            "index": 0,
            "stepDetails": {"type": "message_creation",
                "message_creation": {"message_id": format!("msg_{}", &uuid4()[..8]),
                                     "content_type": "text"}},
            "usage": null,
            "status": "in_progress",
            "runId": run_id,
            "created_at": started,
        });
        lock(&job.inner).run_step = Some(step.clone());
        job.push(&json!({"event": "on_run_step", "data": step}), false);
        aborted = pause(&mut abort, turn.gap).await;
    }
    let reply = format!("echo: {}", turn.text);
    let chars: Vec<char> = reply.chars().collect();
    for (i, chunk) in chars.chunks(4).enumerate() {
        if aborted {
            break;
        }
        let piece: String = chunk.iter().collect();
        lock(&job.inner).aggregated.push_str(&piece);
        job.push(
            &json!({"event": "on_message_delta", "data": {"id": step_id,
                    "delta": {"content": [{"type": "text", "text": piece}]}}}),
            false,
        );
        // The title arrives interleaved with the deltas, on the first turn only.
        if i == 0 {
            if let Some(title) = &turn.title {
                job.push(
                    &json!({"event": "title", "data": {"conversationId": turn.conversation_id,
                            "title": title}}),
                    false,
                );
            }
        }
        aborted = pause(&mut abort, turn.gap).await;
    }
    let output_tokens = reply.split_whitespace().count();
    let input_tokens = turn.text.split_whitespace().count() * 2 + 4;
    if !aborted {
        job.push(
            &json!({"event": "on_token_usage", "data": {
                "input_tokens": input_tokens, "output_tokens": output_tokens,
                "total_tokens": input_tokens + output_tokens, "model": turn.model,
                "provider": "openAI", "runId": run_id, "seq": 1}}),
            false,
        );
    }
    if !aborted {
        if let Some(gate) = &job.gate {
            gate.reached.send_replace(true);
            let mut released = gate.released.subscribe();
            aborted = tokio::select! {
                _ = released.wait_for(|r| *r) => false,
                _ = abort.wait_for(|a| *a) => true,
            };
        }
    }
    let final_frame = finish_turn(&shared, &job, &turn, aborted, output_tokens);
    job.push(&final_frame, true);
    // Nobody may ever subscribe: drop the job after a grace period.
    let shared_for_cleanup = shared.clone();
    tokio::spawn(async move {
        tokio::time::sleep(JOB_LINGER).await;
        shared_for_cleanup.remove_job_if_same(&job);
    });
}

/// Saves the assistant message and builds the `final` frame.
fn finish_turn(shared: &Shared, job: &Job, turn: &Turn, aborted: bool, tokens: usize) -> Value {
    let now = now_ms();
    let aggregated = lock(&job.inner).aggregated.clone();
    let content = json!([{"type": "text", "text": aggregated}]);
    let user_msg_id = turn.user_message["messageId"].clone();
    let object_id = shared.oid.next();
    let mut db = lock(&shared.db);
    // The stored message says unfinished:false even after an abort (as recorded).
    let mut stored = json!({
        "messageId": turn.response_message_id,
        "updatedAt": iso(now),
        "unfinished": false,
        "attachments": [],
        "tokenCount": tokens,
        "content": content,
        "text": "",
        "endpoint": turn.endpoint,
        "sender": turn.endpoint,
        "model": turn.model,
        "isCreatedByUser": false,
        "parentMessageId": user_msg_id,
        "conversationId": turn.conversation_id,
        "createdAt": iso(now),
        "isTemporary": false,
        "error": false,
    });
    if !aborted {
        if let Some(obj) = stored.as_object_mut() {
            obj.insert("metadata".into(), message_metadata(turn, tokens));
        }
    }
    db.messages.push(StoredMessage {
        conversation_id: turn.conversation_id.clone(),
        doc: stored,
    });
    let convo = db.convo_mut(&turn.conversation_id);
    let Some(convo) = convo.filter(|c| c.user_id == turn.user_id) else {
        // Deleted while generating: still close the stream properly.
        return json!({"final": true, "conversation": {"conversationId": turn.conversation_id},
                      "title": "New Chat", "requestMessage": turn.user_message,
                      "responseMessage": {"messageId": turn.response_message_id}});
    };
    if let Some(Value::Array(ids)) = convo.doc.get_mut("messages") {
        ids.push(json!(object_id));
    }
    convo.doc.insert("updatedAt".into(), json!(iso(now)));
    if aborted {
        return json!({
            "final": true,
            "conversation": {"conversationId": turn.conversation_id},
            "title": "New Chat",
            "requestMessage": {
                "messageId": user_msg_id,
                "parentMessageId": turn.user_message["parentMessageId"],
                "conversationId": turn.conversation_id,
                "text": turn.text,
                "isCreatedByUser": true,
            },
            "responseMessage": {
                "messageId": turn.response_message_id,
                "parentMessageId": user_msg_id,
                "conversationId": turn.conversation_id,
                "content": content,
                "sender": turn.endpoint,
                "endpoint": turn.endpoint,
                "model": turn.model,
                "unfinished": true,
                "error": false,
                "isCreatedByUser": false,
            },
            "aborted": true,
            "earlyAbort": false,
        });
    }
    // The final frame shows the conversation as it was before the title landed ("New Chat").
    let snapshot = Value::Object(convo.doc.clone());
    let title = snapshot["title"].clone();
    if let Some(generated) = &turn.title {
        convo.doc.insert("title".into(), json!(generated));
    }
    json!({
        "final": true,
        "conversation": snapshot,
        "title": title,
        "requestMessage": turn.user_message,
        "responseMessage": {
            "messageId": turn.response_message_id,
            "conversationId": turn.conversation_id,
            "parentMessageId": user_msg_id,
            "isCreatedByUser": false,
            "isEdited": false,
            "model": turn.model,
            "sender": turn.endpoint,
            "promptTokens": tokens,
            "endpoint": turn.endpoint,
            "metadata": message_metadata(turn, tokens),
            "text": "",
            "content": content,
            "tokenCount": tokens,
            "attachments": [],
        },
    })
}

fn context_usage(run_id: &str, endpoint: &str, model: &str) -> Value {
    json!({
        "runId": run_id,
        "agentId": format!("{endpoint}__{model}___{endpoint}"),
        "breakdown": {"maxContextTokens": 30400, "messageCount": 1},
        "contextBudget": 28880,
        "remainingContextTokens": 28866,
    })
}

fn message_metadata(turn: &Turn, tokens: usize) -> Value {
    json!({
        "contextUsage": context_usage(&turn.response_message_id, &turn.endpoint, &turn.model),
        "usage": {"input": tokens, "output": tokens, "cacheWrite": 0, "cacheRead": 0},
    })
}

fn open_stream(shared: &Arc<Shared>, ctx: &Ctx, user: &User, stream_id: &str) -> Response<Body> {
    let Some(job) = lock(&shared.jobs).get(stream_id).cloned() else {
        return json_reply(
            StatusCode::NOT_FOUND,
            &json!({"error": "Stream not found",
                    "message": "The generation job does not exist or has expired."}),
        );
    };
    if job.user_id != user.id {
        return json_reply(StatusCode::FORBIDDEN, &json!({"error": "Unauthorized"}));
    }
    let resume = ctx.query.get("resume").is_some_and(|v| v == "true");
    let (start, sync) = {
        let mut inner = lock(&job.inner);
        let first = !inner.subscribed;
        inner.subscribed = true;
        if resume {
            (inner.frames.len(), true)
        } else if first {
            // Everything produced before the first subscriber arrived is replayed to it.
            (0, false)
        } else {
            (inner.frames.len(), false)
        }
    };
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    if sync {
        let frame = sse_frame(
            "message",
            &json!({"sync": true, "resumeState": job.resume_state()}),
        );
        // The channel is fresh and has room: this cannot block or fail.
        let _ = tx.try_send(Bytes::from(frame));
    }
    tokio::spawn(forward_frames(shared.clone(), job, start, tx));
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|frame| (Ok::<_, Infallible>(frame), rx))
    });
    let mut resp = Response::new(Body::from_stream(stream));
    let h = resp.headers_mut();
    set_header(h, "content-type", "text/event-stream");
    set_header(h, "cache-control", "no-cache, no-transform");
    set_header(h, "content-encoding", "identity");
    set_header(h, "x-accel-buffering", "no");
    set_header(h, "connection", "keep-alive");
    resp
}

/// Copies a job's frames to one subscriber, frame by frame, as they are produced.
async fn forward_frames(
    shared: Arc<Shared>,
    job: Arc<Job>,
    mut next: usize,
    tx: mpsc::Sender<Bytes>,
) {
    let mut progress = job.progress.subscribe();
    loop {
        progress.borrow_and_update();
        let (batch, done) = {
            let inner = lock(&job.inner);
            (
                inner.frames[next.min(inner.frames.len())..].to_vec(),
                inner.done,
            )
        };
        for frame in batch {
            if tx.send(frame).await.is_err() {
                return; // the client went away; the generation goes on
            }
            next += 1;
        }
        if done {
            // Delivered the final frame: the job is over for everyone.
            shared.remove_job_if_same(&job);
            return;
        }
        if progress.changed().await.is_err() {
            return;
        }
    }
}

async fn abort_chat(shared: &Arc<Shared>, ctx: &Ctx, user: &User) -> Response<Body> {
    let body = ctx.body();
    let id = ["streamId", "conversationId", "abortKey"]
        .iter()
        .find_map(|k| body.get(*k).and_then(Value::as_str))
        .map(|id| id.split(':').next().unwrap_or(id).to_owned())
        .unwrap_or_default();
    let job = lock(&shared.jobs).get(&id).cloned();
    let Some(job) = job.filter(|j| j.user_id == user.id && !lock(&j.inner).done) else {
        return json_reply(
            StatusCode::NOT_FOUND,
            &json!({"error": "Job not found", "streamId": id}),
        );
    };
    job.abort.send_replace(true);
    // Answer once the partial response is saved and the final frame is out.
    let mut progress = job.progress.subscribe();
    let finished = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if lock(&job.inner).done {
                return;
            }
            if progress.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
    if finished.is_err() {
        return json_reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            &json!({"error": "Abort timed out"}),
        );
    }
    json_reply(
        StatusCode::OK,
        &json!({"success": true, "aborted": job.stream_id}),
    )
}
