//! Validation of request bodies, zod-like.

use super::*;

pub(super) struct Registration {
    pub(super) name: String,
    pub(super) username: Option<String>,
    pub(super) email: String,
    pub(super) password: String,
}

fn zod_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// `z.string().min(min).max(max)`: pushes zod's messages for `key`, returns the string if it is
/// one.
pub(super) fn zod_string(
    body: &Value,
    key: &str,
    min: Option<usize>,
    max: Option<usize>,
    issues: &mut Vec<(String, String)>,
) -> Option<String> {
    match body.get(key) {
        None => {
            issues.push((key.into(), "Required".into()));
            None
        }
        Some(Value::String(s)) => {
            let len = s.chars().count();
            if let Some(min) = min.filter(|m| len < *m) {
                issues.push((
                    key.into(),
                    format!("String must contain at least {min} character(s)"),
                ));
            }
            if let Some(max) = max.filter(|m| len > *m) {
                issues.push((
                    key.into(),
                    format!("String must contain at most {max} character(s)"),
                ));
            }
            Some(s.clone())
        }
        Some(other) => {
            issues.push((
                key.into(),
                format!("Expected string, received {}", zod_type(other)),
            ));
            None
        }
    }
}

/// LibreChat's errorsToString: `"<path>: <message>"` joined by spaces (a root issue has an empty
/// path, hence `": The passwords did not match"`).
pub(super) fn errors_to_string(issues: &[(String, String)]) -> String {
    issues
        .iter()
        .map(|(path, msg)| format!("{path}: {msg}"))
        .collect::<Vec<_>>()
        .join(" ")
}

pub(super) fn validate_registration(body: &Value) -> Result<Registration, String> {
    let mut issues = Vec::new();
    let name = zod_string(body, "name", Some(3), Some(80), &mut issues);
    let username = match body.get("username") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => {
            let len = s.chars().count();
            // Approximation of the script whitelist and the injection blacklist.
            let allowed = |c: char| c.is_alphanumeric() || "_.@#$%&*()-".contains(c);
            let injection = [
                "'", "--", "$ne", "$gt", "$lt", "$or", "{", "}", ";", "<", ">", "/", "=",
            ]
            .iter()
            .any(|p| s.contains(p));
            if !(2..=80).contains(&len) || !s.chars().all(allowed) || injection {
                issues.push(("username".into(), "Invalid input".into()));
            }
            Some(s.clone())
        }
        Some(other) => {
            issues.push((
                "username".into(),
                format!("Expected string, received {}", zod_type(other)),
            ));
            None
        }
    };
    let email = zod_string(body, "email", None, None, &mut issues);
    if email.as_deref().is_some_and(|e| !is_valid_email(e)) {
        issues.push(("email".into(), "Invalid email".into()));
    }
    let password_rules = |key: &str, issues: &mut Vec<(String, String)>| {
        let value = zod_string(body, key, Some(8), Some(128), issues);
        if value.as_deref().is_some_and(|p| p.trim().is_empty()) {
            issues.push((key.into(), "Password cannot be only spaces".into()));
        }
        value
    };
    let password = password_rules("password", &mut issues);
    let confirm = password_rules("confirm_password", &mut issues);
    // The object-level refinement only runs when every field parsed.
    if issues.is_empty() && password != confirm {
        issues.push((String::new(), "The passwords did not match".into()));
    }
    if !issues.is_empty() {
        return Err(errors_to_string(&issues));
    }
    Ok(Registration {
        name: name.unwrap_or_default(),
        username,
        email: email.unwrap_or_default().trim().to_lowercase(),
        password: password.unwrap_or_default(),
    })
}

/// zod's email check: a local part of `[A-Za-z0-9_'+\-.]` not starting with a dot, without
/// `..`, ending in `[A-Za-z0-9_+-]`; a dotted domain whose last label is 2+ letters.
pub(super) fn is_valid_email(email: &str) -> bool {
    let Some((local, domain)) = email.rsplit_once('@') else {
        return false;
    };
    let local_ok = !local.is_empty()
        && !local.starts_with('.')
        && !local.contains("..")
        && local
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_'+-.".contains(c))
        && local
            .chars()
            .last()
            .is_some_and(|c| c.is_ascii_alphanumeric() || "_+-".contains(c));
    let labels: Vec<&str> = domain.split('.').collect();
    let domain_ok = labels.len() >= 2
        && labels[..labels.len() - 1].iter().all(|l| {
            l.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
        && labels
            .last()
            .is_some_and(|tld| tld.len() >= 2 && tld.chars().all(|c| c.is_ascii_alphabetic()));
    local_ok && domain_ok
}

pub(super) fn js_truthy(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_f64().is_some_and(|f| f != 0.0),
        Some(Value::String(s)) => !s.is_empty(),
        Some(_) => true,
    }
}
