//! Setting Nova Sonic up: `sonora doctor` judges only the configured
//! engine, finds credentials through the AWS SDK's default chain, and the
//! Region comes from `nova_sonic.region`, else the AWS chain, else
//! us-east-1. Each case runs the binary in an empty directory with an
//! environment built from scratch (no profile files, no instance metadata).

#![allow(clippy::unwrap_used, reason = "a failed step must fail the test")]

use std::process::{Command, Output};

use scratch::Scratch;

#[path = "common/scratch.rs"]
mod scratch;

/// An empty working directory of its own for one case, removed after it.
fn scratch(name: &str) -> Scratch {
    Scratch::new(&format!("setup-{name}"))
}

/// `sonora doctor` with `settings` as `--set` and only the environment
/// given here (plus `PATH`).
fn doctor(name: &str, settings: &[&str], env: &[(&str, &str)]) -> (Output, String) {
    let dir = scratch(name);
    let mut command = Command::new(env!("CARGO_BIN_EXE_sonora"));
    command
        .current_dir(&dir)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", &dir)
        .env("AWS_CONFIG_FILE", dir.join("no-config"))
        .env("AWS_SHARED_CREDENTIALS_FILE", dir.join("no-credentials"))
        .env("AWS_EC2_METADATA_DISABLED", "true")
        // No local model here, whatever the machine has installed.
        .args(["--set", "local.model_dir=no-model"]);
    for setting in settings {
        command.args(["--set", setting]);
    }
    for (key, value) in env {
        command.env(key, value);
    }
    let output = command.arg("doctor").output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    (output, stdout)
}

const KEYS: [(&str, &str); 2] = [
    ("AWS_ACCESS_KEY_ID", "AKIDSONORASETUP1234"),
    ("AWS_SECRET_ACCESS_KEY", "not-a-real-secret"),
];

#[test]
fn a_nova_sonic_setup_needs_credentials_not_the_local_model() {
    let (output, stdout) = doctor("nova", &["engine.kind=nova-sonic"], &KEYS);
    assert!(output.status.success(), "{stdout}\n{:?}", output);
    assert!(stdout.contains("MISSING speech model"), "{stdout}");
    assert!(
        stdout.contains("found (access key …1234, long-term)"),
        "{stdout}"
    );
    assert!(stdout.contains("nova-sonic engine: ready"), "{stdout}");

    // Without credentials the configured engine cannot work.
    let (output, stdout) = doctor("nova-bare", &["engine.kind=nova-sonic"], &[]);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("nova-sonic engine: not ready"), "{stdout}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no AWS credentials"), "{stderr}");

    // The local engine still needs its model, credentials or not.
    let (output, stdout) = doctor("local", &["engine.kind=local"], &KEYS);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("local engine: not ready"), "{stdout}");
}

#[test]
fn credentials_from_a_container_role_count() {
    // The ECS/container credentials endpoint, served here: the default
    // chain reads temporary credentials from it as it would on a task or
    // a pod with a role.
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    let serve = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut socket, _) = server.accept().unwrap();
        let mut request = [0u8; 4096];
        let _ = socket.read(&mut request).unwrap();
        let body = r#"{"AccessKeyId":"ASIASONORAROLE9876","SecretAccessKey":"not-a-real-secret","Token":"token","Expiration":"2099-01-01T00:00:00Z"}"#;
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        socket.write_all(response.as_bytes()).unwrap();
    });
    let uri = format!("http://127.0.0.1:{port}/role");
    let (output, stdout) = doctor(
        "container",
        &["engine.kind=nova-sonic"],
        &[("AWS_CONTAINER_CREDENTIALS_FULL_URI", uri.as_str())],
    );
    serve.join().unwrap();
    assert!(output.status.success(), "{stdout}\n{:?}", output);
    assert!(
        stdout.contains("found (access key …9876, temporary)"),
        "{stdout}"
    );
}

#[test]
fn the_region_comes_from_the_setting_then_the_aws_chain_then_us_east_1() {
    let nova = "engine.kind=nova-sonic";
    let with_region = [KEYS[0], KEYS[1], ("AWS_REGION", "eu-north-1")];

    // Not configured: the environment's.
    let (_, stdout) = doctor("region-env", &[nova], &with_region);
    assert!(
        stdout.contains("Nova Sonic calls eu-north-1 (from the AWS environment"),
        "{stdout}"
    );

    // Not configured, no environment: the profile's.
    let dir = scratch("region-profile");
    let config = dir.join("aws-config");
    std::fs::write(&config, "[default]\nregion = ap-northeast-1\n").unwrap();
    let config = config.display().to_string();
    let (_, stdout) = doctor(
        "region-profile",
        &[nova],
        &[KEYS[0], KEYS[1], ("AWS_CONFIG_FILE", config.as_str())],
    );
    assert!(
        stdout.contains("Nova Sonic calls ap-northeast-1 (from the AWS environment"),
        "{stdout}"
    );

    // Configured: it wins over the environment.
    let (_, stdout) = doctor(
        "region-set",
        &[nova, "nova_sonic.region=eu-central-1"],
        &with_region,
    );
    assert!(
        stdout.contains("Nova Sonic calls eu-central-1 (from nova_sonic.region)"),
        "{stdout}"
    );

    // Nothing anywhere: the fallback.
    let (_, stdout) = doctor("region-none", &[nova], &KEYS);
    assert!(
        stdout.contains("Nova Sonic calls us-east-1 (from the built-in default)"),
        "{stdout}"
    );
}

#[test]
fn the_turn_end_model_is_reported_but_optional() {
    // Not installed here: reported, and the configured engine is still ready.
    let (output, stdout) = doctor("turn-missing", &["engine.kind=nova-sonic"], &KEYS);
    assert!(output.status.success(), "{stdout}\n{:?}", output);
    assert!(stdout.contains("MISSING turn-end model"), "{stdout}");
    assert!(stdout.contains("install-turn-model"), "{stdout}");

    let (_, stdout) = doctor("turn-off", &["local.turn_model="], &KEYS);
    assert!(stdout.contains("ok      turn-end model    off"), "{stdout}");

    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("models/smart-turn/smart-turn-v3.2-cpu.onnx");
    let library = root.join("models/onnxruntime/libonnxruntime.so.1.32.0");
    if !model.is_file() || !library.is_file() {
        eprintln!("\n\n*** SKIPPED: the loading half needs scripts/install-turn-model ***\n");
        return;
    }
    let model = format!("local.turn_model={}", model.display());
    let library = format!("local.onnxruntime_library={}", library.display());
    let (_, stdout) = doctor("turn-installed", &[&model, &library], &KEYS);
    assert!(stdout.contains("ok      turn-end model"), "{stdout}");
    assert!(stdout.contains("(one run: "), "{stdout}");
}
