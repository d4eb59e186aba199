//! The example manifests (`container/examples/*.yaml`) as Kubernetes YAML for a real consumer of it: `podman kube
//! play`, then one sync between the two pods they describe, on loop devices.
//!
//! The manifests are the ones users read; the test only substitutes fields (with serde_yaml) where podman 4.3
//! cannot take them as they are, or where names must be unique to this run:
//!
//! - `kind: Job` and `kind: Service` are not kinds podman plays (it skips them without a word): the Job's pod
//!   template is played as a `kind: Pod`, and the Service's stable name is the destination pod's name on the
//!   scenario's podman network (aardvark-dns resolves pod names), which becomes the source's `DESTINATION_ADDRESS`.
//!   `examples.rs` checks the Service against the Job instead.
//! - `volumeDevices` is ignored by podman, and a `persistentVolumeClaim` is a podman named volume (a directory):
//!   the `data` volume becomes a `hostPath` of type `BlockDevice` (the loop device), mounted at the `devicePath`.
//!   podman ignores `readOnly` on it: the source's device is writable in podman (not in a cluster).
//! - The key Secret (`kubectl create secret generic ... --from-file=psk.txt` in the README) is a `hostPath`
//!   directory laid out as the kubelet lays out a Secret volume for the pod's fsGroup (`psk.txt ->
//!   ..data/psk.txt`, `root:65532 0640`). podman 4.3 does play `kind: Secret` documents and `secret` volumes
//!   (with `optional` written out; without it, it crashes), but it writes the Secret's `data` into the volume
//!   still base64-encoded, ignores `stringData`, and makes the file `root 0644` whatever `defaultMode` says:
//!   no mover could read a key from it.
//! - An `emptyDir` is a volume named after the pod's volume (`tmp`), shared by every pod with one of that name
//!   (and on disk: `medium: Memory` is ignored): each pod's gets a name of its own, or the two pods would write
//!   one status file.
//! - The image is this run's, and the device nodes are owned by the pod's `runAsUser:runAsGroup`, as with
//!   containerd/CRI-O's `device_ownership_from_security_context`.
//!
//! What podman does apply, and the test checks with `podman inspect`: the pod's `runAsUser`/`runAsGroup`,
//! `readOnlyRootFilesystem`, `capabilities: drop: [ALL]`, `allowPrivilegeEscalation: false` and
//! `restartPolicy: Never`.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use blockmover::sample::{self, SampleSpec};
use serde_yaml::{Mapping, Value};

use super::examples::{example, named, named_mut, of_kind, seq_mut, str_of, template};
use super::podman::{engine, Engine, Ran, SAFETY_NET};
use super::scenario::{timer, Scenario, Shape, SIZE, UID};

/// Everything `podman kube play` made, removed on drop (also when the test fails): the pods (with their
/// containers), the secrets and the named volumes (the PVCs', the emptyDirs' and the secrets').
struct Played {
    engine: &'static Engine,
    pods: Vec<String>,
    secrets: Vec<String>,
    volumes: Vec<String>,
}

impl Played {
    fn new(engine: &'static Engine) -> Played {
        Played {
            engine,
            pods: Vec::new(),
            secrets: Vec::new(),
            volumes: Vec::new(),
        }
    }
}

impl Drop for Played {
    fn drop(&mut self) {
        let e = self.engine;
        for pod in &self.pods {
            if let Err(err) = e.podman(&["pod", "rm", "-f", "-t", "0", "--ignore", pod]) {
                eprintln!("warning: {err:#}");
            }
        }
        for secret in &self.secrets {
            if e.podman(&["secret", "inspect", secret]).is_ok() {
                if let Err(err) = e.podman(&["secret", "rm", secret]) {
                    eprintln!("warning: {err:#}");
                }
            }
        }
        for volume in &self.volumes {
            if e.podman(&["volume", "exists", volume]).is_ok() {
                if let Err(err) = e.podman(&["volume", "rm", "-f", volume]) {
                    eprintln!("warning: {err:#}");
                }
            }
        }
    }
}

/// One side of the example, ready for `podman kube play`.
struct Side {
    /// The pod's name (and the destination's "Service" name).
    pod: String,
    /// The mover container: `<pod>-blockmover`.
    container: String,
    yaml: String,
}

/// The example `file` as podman 4.3 can play it (see the module's documentation), for the pod `pod`: the
/// scenario's key, and its target (destination) or volume (the source, sending to the pod `destination`).
fn playable(
    s: &Scenario,
    file: &str,
    pod: &str,
    destination: Option<&str>,
    played: &mut Played,
) -> Result<Side> {
    let docs = example(file)?;
    let device = match destination {
        None => &s.target.path,
        Some(_) => &s.volume.path,
    };
    let mut out = Vec::new();

    // The PVC as written, under this run's name: podman makes a named volume of it (unused: see `data` below).
    let mut pvc = of_kind(&docs, "PersistentVolumeClaim")?.clone();
    let claim = format!("{pod}-pvc");
    pvc["metadata"]["name"] = claim.clone().into();
    played.volumes.push(claim);
    out.push(pvc);

    let (template, _) = template(&docs)?;
    let mut spec = template["spec"].clone();
    let mut metadata = template["metadata"].clone();
    metadata["name"] = pod.into();
    let tmp = format!("{pod}-tmp");
    let keys = s.dir.path().join("keys");
    for volume in seq_mut(&mut spec["volumes"], "volumes")? {
        match volume["name"].as_str() {
            Some("data") => {
                let mut host = Mapping::new();
                host.insert("path".into(), device.display().to_string().into());
                host.insert("type".into(), "BlockDevice".into());
                let mut v = Mapping::new();
                v.insert("name".into(), "data".into());
                v.insert("hostPath".into(), host.into());
                *volume = v.into();
            }
            Some("keys") => {
                let secret = str_of(&volume["secret"]["secretName"], "secretName")?;
                println!(
                    "{file}: the Secret {secret} is the directory {}",
                    keys.display()
                );
                let mut host = Mapping::new();
                host.insert("path".into(), keys.display().to_string().into());
                host.insert("type".into(), "Directory".into());
                let mut v = Mapping::new();
                v.insert("name".into(), "keys".into());
                v.insert("hostPath".into(), host.into());
                *volume = v.into();
            }
            Some("tmp") => volume["name"] = tmp.clone().into(),
            _ => {}
        }
    }
    let container = named_mut(&mut spec["containers"], "blockmover")?;
    container["image"] = s.engine.image.clone().into();
    let devices = container
        .as_mapping_mut()
        .context("container")?
        .remove("volumeDevices")
        .context("volumeDevices")?;
    let device_path = named(&devices, "data")?["devicePath"].clone();
    let mounts = seq_mut(&mut container["volumeMounts"], "volumeMounts")?;
    for mount in mounts.iter_mut() {
        if mount["name"].as_str() == Some("tmp") {
            mount["name"] = tmp.clone().into();
        }
    }
    let mut mount = Mapping::new();
    mount.insert("name".into(), "data".into());
    mount.insert("mountPath".into(), device_path);
    mounts.push(mount.into());
    if let Some(destination) = destination {
        named_mut(&mut container["env"], "DESTINATION_ADDRESS")?["value"] = destination.into();
    }
    let mut doc = Mapping::new();
    doc.insert("apiVersion".into(), "v1".into());
    doc.insert("kind".into(), "Pod".into());
    doc.insert("metadata".into(), metadata);
    doc.insert("spec".into(), spec);
    out.push(doc.into());
    played.pods.push(pod.to_owned());
    played.volumes.push(tmp);

    let mut yaml = String::new();
    for doc in &out {
        yaml.push_str("---\n");
        yaml.push_str(&serde_yaml::to_string(doc)?);
    }
    Ok(Side {
        pod: pod.to_owned(),
        container: format!("{pod}-blockmover"),
        yaml,
    })
}

/// `podman kube play --network NET -` of `side`, then checks that podman applied the security context.
fn play(s: &Scenario, side: &Side) -> Result<()> {
    use std::io::Write;
    println!("--- podman kube play {}:\n{}", side.pod, side.yaml);
    let mut child = s
        .engine
        .command()
        .args(["kube", "play", "--network", &s.network.name, "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("spawn podman kube play")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(side.yaml.as_bytes())?;
    let out = child.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{}{stderr}", String::from_utf8_lossy(&out.stdout));
    ensure!(
        out.status.success(),
        "podman kube play {}: {}: {stderr}",
        side.pod,
        out.status
    );
    let format = "{{.Config.User}} {{.HostConfig.ReadonlyRootfs}} {{.EffectiveCaps}} \
                  {{.HostConfig.SecurityOpt}} {{.HostConfig.RestartPolicy.Name}}";
    let applied = s
        .engine
        .podman(&["inspect", "--format", format, &side.container])?;
    println!("{}: {applied}", side.container);
    let applied: Vec<&str> = applied.split_whitespace().collect();
    assert_eq!(applied[0], format!("{UID}:{UID}"), "runAsUser:runAsGroup");
    assert_eq!(applied[1], "true", "readOnlyRootFilesystem");
    assert_eq!(applied[2], "[]", "capabilities: drop: [ALL]");
    let (restart, options) = applied[3..].split_last().context("inspect")?;
    let options = options.join(" ");
    assert!(
        options.contains("no-new-privileges"),
        "allowPrivilegeEscalation: {options}"
    );
    assert_eq!(*restart, "no", "restartPolicy: Never");
    Ok(())
}

/// `podman logs` of a container.
fn logs(engine: &Engine, container: &str) -> Result<String> {
    let out = engine.command().args(["logs", container]).output()?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok(text)
}

/// `running` or `exited` and the exit code.
fn state(engine: &Engine, container: &str) -> Result<(String, i32)> {
    let format = "{{.State.Status}} {{.State.ExitCode}}";
    let state = engine.podman(&["inspect", "--format", format, container])?;
    let (status, code) = state.trim().split_once(' ').context("state")?;
    Ok((status.to_owned(), code.parse()?))
}

/// Waits (within the safety net) for a line of the container's log containing `needle`.
fn wait_for_line(engine: &Engine, container: &str, needle: &str) -> Result<()> {
    let deadline = Instant::now() + SAFETY_NET;
    loop {
        let text = logs(engine, container)?;
        if text.contains(needle) {
            return Ok(());
        }
        let (status, _) = state(engine, container)?;
        if status == "exited" || Instant::now() > deadline {
            bail!("{container} ({status}) without {needle:?}:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits (within the safety net) for the container to exit: its code and log.
fn finish(engine: &Engine, container: &str) -> Result<Ran> {
    let deadline = Instant::now() + SAFETY_NET;
    let code = loop {
        let (status, code) = state(engine, container)?;
        if status == "exited" {
            break code;
        }
        if Instant::now() > deadline {
            bail!("{container} hangs:\n{}", logs(engine, container)?);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = logs(engine, container)?;
    println!("--- {container} (exit {code}):\n{output}");
    Ok(Ran {
        name: container.to_owned(),
        code: Some(code),
        output,
    })
}

/// Standard base64 with padding (a Secret's `data`).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The destination example's pod with its `keys` Secret volume as written, the Secret (the scenario's key) a
/// `kind: Secret` document in the same YAML, and a command that prints the key: what podman makes of them.
/// Returns what the pod read at `/keys/psk.txt`.
fn secret_volume_as_written(s: &Scenario) -> Result<Vec<u8>> {
    let key = std::fs::read(s.dir.path().join("keys/psk.txt"))?;
    let pod = s.engine.unique_name("secret");
    let secret = format!("{pod}-key");
    let mut played = Played::new(s.engine);
    let docs = example("destination.yaml")?;
    let (template, _) = template(&docs)?;
    let mut spec = template["spec"].clone();
    let tmp = format!("{pod}-tmp");
    for volume in seq_mut(&mut spec["volumes"], "volumes")? {
        match volume["name"].as_str() {
            Some("keys") => volume["secret"]["secretName"] = secret.clone().into(),
            Some("tmp") => volume["name"] = tmp.clone().into(),
            _ => {}
        }
    }
    let container = named_mut(&mut spec["containers"], "blockmover")?;
    container["image"] = s.engine.image.clone().into();
    container["command"] = serde_yaml::to_value(["/bin/cat", "/keys/psk.txt"])?;
    named_mut(&mut container["volumeMounts"], "tmp")?["name"] = tmp.clone().into();
    let mut metadata = template["metadata"].clone();
    metadata["name"] = pod.clone().into();
    let yaml = format!(
        "---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: {secret}\ndata:\n  psk.txt: {}\n---\n{}",
        base64(&key),
        serde_yaml::to_string(&serde_yaml::to_value(serde_yaml::Mapping::from_iter([
            ("apiVersion".into(), Value::from("v1")),
            ("kind".into(), "Pod".into()),
            ("metadata".into(), metadata),
            ("spec".into(), spec),
        ]))?)?
    );
    played.pods.push(pod.clone());
    played.secrets.push(secret.clone());
    played.volumes.extend([secret, tmp]);
    let side = Side {
        container: format!("{pod}-blockmover"),
        pod,
        yaml,
    };
    play(s, &side)?;
    let ran = finish(s.engine, &side.container)?;
    ran.expect_code(0);
    let out = s
        .engine
        .command()
        .args(["logs", &side.container])
        .output()?;
    Ok(out.stdout)
}

/// One sync as the README has it: the destination's Job (here its pod) applied, then the source's; both
/// deleted once they ended.
fn sync(s: &Scenario, dst: &str, src: &str) -> Result<(Ran, Ran)> {
    let started = Instant::now();
    let mut played = Played::new(s.engine);
    let destination = playable(s, "destination.yaml", dst, None, &mut played)?;
    let source = playable(s, "source.yaml", src, Some(dst), &mut played)?;
    play(s, &destination)?;
    wait_for_line(s.engine, &destination.container, "listening on ")?;
    println!(
        "{:.1} s: the destination pod listens",
        started.elapsed().as_secs_f64()
    );
    play(s, &source)?;
    let client = finish(s.engine, &source.container)?;
    let server = finish(s.engine, &destination.container)?;
    println!("{:.1} s: both pods ended", started.elapsed().as_secs_f64());
    Ok((server, client))
}

#[test]
fn container_examples_played_by_podman_kube_play_sync_a_loop_device() -> Result<()> {
    let Some(engine) = engine()? else {
        return Ok(());
    };
    let _t = timer("examples played by podman kube play");
    let s = Scenario::new(
        engine,
        &SampleSpec::mixed(SIZE, 0x13_000a),
        Shape::OwnedByPodUser,
    )?;
    let (dst, src) = (engine.unique_name("dst"), engine.unique_name("src"));
    let (server, client) = sync(&s, &dst, &src)?;
    s.expect_success(&server, &client)?;
    // Through the pod's name; podman's DNS may learn the destination's name a moment after it listens, and a
    // failed lookup is retryable: the entrypoint's next try then connects (the sync is still one session).
    let done = client.expect_line(&format!("source, to {dst}:8000, try "));
    if !done.contains("try 1/5") {
        println!("the source connected after a retry: {done}");
    }
    server.expect_line(", session 1)");

    // "Delete and re-apply it for the next": the same pods again send only what changed.
    let change = sample::scattered_change(&s.volume.path, SIZE, 0.01, 0x13_000b)?;
    let (server, client) = sync(&s, &dst, &src)?;
    s.expect_success(&server, &client)?;
    let sent = server.figure("blocks sent ");
    let changed = change.blocks.len() as u64;
    server.check(sent == Some(changed), &format!("{changed} blocks changed"));

    // The example's Secret volume as written plays (podman 4.3 crashes on one without `optional`), but what
    // the pod reads is not the key itself on podman 4.3: the sync above mounts the key from a directory.
    let key = std::fs::read(s.dir.path().join("keys/psk.txt"))?;
    let read = secret_volume_as_written(&s)?;
    let (read, key) = (
        String::from_utf8_lossy(&read),
        String::from_utf8_lossy(&key),
    );
    if read.trim_end() == key.trim_end() {
        println!(
            "podman wrote the Secret's data into the secret volume decoded, as the kubelet does"
        );
    } else {
        assert_eq!(
            read.trim_end(),
            base64(key.as_bytes()),
            "the secret volume holds neither the key nor its base64"
        );
        println!("podman wrote the Secret's data into the secret volume still base64-encoded");
    }
    Ok(())
}
