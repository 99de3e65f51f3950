//! `compose.librechat.yaml` cannot run here (no Docker engine), so this checks that it agrees
//! with the service: names, ports, the environment LibreChat needs, and that every `BFF__…`
//! variable names a real setting of `config/default.toml`.

use std::collections::BTreeSet;

use yaml_rust2::{Yaml, YamlLoader};

fn root() -> &'static str {
    env!("CARGO_MANIFEST_DIR")
}

fn compose() -> Yaml {
    let text = std::fs::read_to_string(format!("{}/compose.librechat.yaml", root()))
        .expect("compose.librechat.yaml");
    YamlLoader::load_from_str(&text)
        .expect("valid YAML")
        .into_iter()
        .next()
        .expect("one document")
}

fn env_of(service: &Yaml) -> Vec<(String, String)> {
    service["environment"]
        .as_hash()
        .expect("environment is a map")
        .iter()
        .map(|(k, v)| {
            let value = match v {
                Yaml::String(s) => s.clone(),
                Yaml::Integer(i) => i.to_string(),
                Yaml::Boolean(b) => b.to_string(),
                other => panic!("unexpected env value {other:?}"),
            };
            (k.as_str().expect("key").to_owned(), value)
        })
        .collect()
}

fn get<'a>(env: &'a [(String, String)], key: &str) -> &'a str {
    env.iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("{key} is not set"))
}

#[test]
fn services_ports_and_networks() {
    let doc = compose();
    let services = doc["services"].as_hash().expect("services");
    let names: BTreeSet<&str> = services.keys().filter_map(Yaml::as_str).collect();
    assert_eq!(
        names,
        BTreeSet::from(["librechat", "librechat-bff", "mongodb", "redis"])
    );
    for (name, svc) in services {
        let publishes = !svc["ports"].is_badvalue();
        assert_eq!(
            publishes,
            name.as_str() == Some("librechat-bff"),
            "only the BFF publishes a port ({name:?})"
        );
    }
    let redis_cmd: Vec<&str> = doc["services"]["redis"]["command"]
        .as_vec()
        .expect("redis command")
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    assert!(redis_cmd.windows(2).any(|w| w == ["--appendonly", "yes"]));
    let image = doc["services"]["librechat"]["image"]
        .as_str()
        .expect("image");
    assert!(
        image.starts_with("ghcr.io/danny-avila/librechat:v"),
        "pinned official image: {image}"
    );
    assert_eq!(doc["networks"]["data"]["internal"].as_bool(), Some(true));
    let bff = &doc["services"]["librechat-bff"];
    assert_eq!(bff["build"]["dockerfile"].as_str(), Some("Dockerfile"));
}

#[test]
fn librechat_runs_as_the_contract_requires() {
    let doc = compose();
    let env = env_of(&doc["services"]["librechat"]);
    for (key, value) in [
        ("ALLOW_REGISTRATION", "true"),
        ("ALLOW_PASSWORD_RESET", "true"),
        ("ALLOW_UNVERIFIED_EMAIL_LOGIN", "true"),
        ("TRUST_PROXY", "1"),
    ] {
        assert_eq!(get(&env, key), value, "{key}");
    }
    assert!(
        env.iter().all(|(k, _)| !k.starts_with("EMAIL_")),
        "no email service: requestPasswordReset must return the link"
    );
    let port = get(&env, "PORT");
    let bff = env_of(&doc["services"]["librechat-bff"]);
    assert_eq!(
        get(&bff, "BFF__LIBRECHAT__URL"),
        format!("http://librechat:{port}"),
        "the BFF reaches LibreChat by service name and port"
    );
    assert_eq!(get(&bff, "BFF__REDIS__URL"), "redis://redis:6379/0");
    let listen_port = get(&bff, "BFF__SERVER__LISTEN")
        .rsplit(':')
        .next()
        .expect("port")
        .to_owned();
    let published: Vec<String> = doc["services"]["librechat-bff"]["ports"]
        .as_vec()
        .expect("ports")
        .iter()
        .filter_map(|p| p.as_str().map(str::to_owned))
        .collect();
    assert!(
        published
            .iter()
            .all(|p| p.ends_with(&format!(":{listen_port}"))),
        "{published:?} vs listen port {listen_port}"
    );
}

/// `BFF__A__B__C` must name `[a.b] c` (or its `_file` twin) in config/default.toml.
#[test]
fn every_bff_variable_names_a_real_setting() {
    let defaults: toml::Table = std::fs::read_to_string(format!("{}/config/default.toml", root()))
        .expect("default.toml")
        .parse()
        .expect("toml");
    let doc = compose();
    let env = env_of(&doc["services"]["librechat-bff"]);
    let bff_vars: Vec<&String> = env
        .iter()
        .map(|(k, _)| k)
        .filter(|k| k.starts_with("BFF__"))
        .collect();
    assert!(bff_vars.len() >= 10);
    for var in bff_vars {
        let path: Vec<String> = var["BFF__".len()..]
            .split("__")
            .map(str::to_lowercase)
            .collect();
        let (key, sections) = path.split_last().expect("key");
        let mut table = &defaults;
        for s in sections {
            table = table
                .get(s)
                .and_then(|v| v.as_table())
                .unwrap_or_else(|| panic!("{var}: no section [{s}]"));
        }
        let base = key.strip_suffix("_file").unwrap_or(key);
        assert!(
            table.contains_key(key) || table.contains_key(base),
            "{var}: no setting `{key}` in default.toml"
        );
    }
    // Secrets come from files: none inline.
    for (k, _) in &env {
        if k.contains("SECRET") || k.contains("TOKEN") || k.contains("KEYS") {
            assert!(k.ends_with("_FILE"), "{k} must use a _file secret");
        }
    }
}

#[test]
fn the_env_example_lists_every_variable_and_the_readme_matches() {
    let text =
        std::fs::read_to_string(format!("{}/compose.librechat.yaml", root())).expect("compose");
    let mut used = BTreeSet::new();
    let mut rest = text.as_str();
    while let Some(i) = rest.find("${") {
        let after = &rest[i + 2..];
        let end = after.find('}').expect("closing brace");
        let name = after[..end].split([':', '-']).next().unwrap_or_default();
        used.insert(name.to_owned());
        rest = &after[end..];
    }
    let doc = compose();
    for secret in doc["secrets"].as_hash().expect("secrets").values() {
        used.insert(
            secret["environment"]
                .as_str()
                .expect("env secret")
                .to_owned(),
        );
    }
    let example =
        std::fs::read_to_string(format!("{}/.env.example", root())).expect(".env.example");
    let listed: BTreeSet<String> = example
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('=').map(|(k, _)| k.trim().to_owned()))
        .collect();
    let missing: Vec<_> = used.difference(&listed).collect();
    assert!(missing.is_empty(), ".env.example lacks {missing:?}");

    let readme = std::fs::read_to_string(format!("{}/README.md", root())).expect("README");
    assert!(readme.contains("docker compose -f compose.librechat.yaml up -d"));
    assert!(readme.contains("cp .env.example .env"));
}
