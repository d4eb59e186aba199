//! The example manifests (`container/examples/*.yaml`) read as YAML: the helpers `kube.rs` plays them with, and
//! what no consumer of a Pod checks: the Service selects the Job's pods and the ports agree, the source sends to
//! that Service, both sides use the same key Secret, the mover contract's paths, and every variable the examples
//! set is one the entrypoints read. Runs without podman or root.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{ensure, Context, Result};
use serde_yaml::Value;

use super::scenario::UID;

/// The repository's `container/` directory.
pub fn container_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/container"))
}

/// The YAML documents of `container/examples/NAME`.
pub fn example(name: &str) -> Result<Vec<Value>> {
    let path = container_dir().join("examples").join(name);
    let text = std::fs::read_to_string(&path).with_context(|| format!("{path:?}"))?;
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value = serde::Deserialize::deserialize(doc).with_context(|| format!("{path:?}"))?;
        docs.push(value);
    }
    Ok(docs)
}

/// The one document of `kind`.
pub fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Result<&'a Value> {
    let mut found = docs.iter().filter(|d| d["kind"].as_str() == Some(kind));
    let doc = found.next().with_context(|| format!("no {kind}"))?;
    ensure!(found.next().is_none(), "more than one {kind}");
    Ok(doc)
}

pub fn str_of<'a>(v: &'a Value, what: &str) -> Result<&'a str> {
    v.as_str()
        .with_context(|| format!("{what} is not a string: {v:?}"))
}

pub fn seq_of<'a>(v: &'a Value, what: &str) -> Result<&'a Vec<Value>> {
    v.as_sequence()
        .with_context(|| format!("{what} is not a list: {v:?}"))
}

pub fn seq_mut<'a>(v: &'a mut Value, what: &str) -> Result<&'a mut Vec<Value>> {
    let text = format!("{what} is not a list: {v:?}");
    v.as_sequence_mut().context(text)
}

/// The entry of a list of `name:`d entries (containers, volumes, mounts, env).
pub fn named<'a>(list: &'a Value, name: &str) -> Result<&'a Value> {
    seq_of(list, "list")?
        .iter()
        .find(|e| e["name"].as_str() == Some(name))
        .with_context(|| format!("no entry named {name:?} in {list:?}"))
}

pub fn named_mut<'a>(list: &'a mut Value, name: &str) -> Result<&'a mut Value> {
    seq_mut(list, "list")?
        .iter_mut()
        .find(|e| e["name"].as_str() == Some(name))
        .with_context(|| format!("no entry named {name:?}"))
}

/// The Job's pod template and its `blockmover` container.
pub fn template(docs: &[Value]) -> Result<(&Value, &Value)> {
    let template = &of_kind(docs, "Job")?["spec"]["template"];
    let container = named(&template["spec"]["containers"], "blockmover")?;
    Ok((template, container))
}

/// The variables a script reads: every `$NAME` and `${NAME` in it.
pub fn variables_read(script: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (i, _) in script.match_indices('$') {
        let rest = script[i + 1..]
            .strip_prefix('{')
            .unwrap_or(&script[i + 1..]);
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if name.starts_with(|c: char| c.is_ascii_uppercase()) {
            names.insert(name);
        }
    }
    names
}

#[test]
fn container_examples_service_selects_the_destination_and_set_only_variables_the_entrypoints_read(
) -> Result<()> {
    let common = std::fs::read_to_string(container_dir().join("common.sh"))?;
    let mut secrets = Vec::new();
    for (file, script) in [
        ("destination.yaml", "server.sh"),
        ("source.yaml", "client.sh"),
    ] {
        let docs = example(file)?;
        let (template, container) = template(&docs).context(file)?;
        let spec = &template["spec"];
        let command = seq_of(&container["command"], "command")?;
        let entrypoint = format!("/mover-rsync-tls/{script}");
        assert_eq!(
            command.last().and_then(Value::as_str),
            Some(entrypoint.as_str()),
            "{file}: the command does not run {script}"
        );
        // Every variable the example sets is one its entrypoint (or common.sh) reads.
        let text = std::fs::read_to_string(container_dir().join(script))? + &common;
        let read = variables_read(&text);
        for env in seq_of(&container["env"], "env")? {
            let name = str_of(&env["name"], "env name")?;
            assert!(
                read.contains(name),
                "{file}: {name} is set, but {script} and common.sh read only {read:?}"
            );
            str_of(&env["value"], name).context("env values are strings")?;
        }
        // The mover contract: the block PVC at /dev/block, the key at /keys, an emptyDir at /tmp.
        let device = named(&container["volumeDevices"], "data")?;
        assert_eq!(device["devicePath"].as_str(), Some("/dev/block"), "{file}");
        let claim = str_of(
            &named(&spec["volumes"], "data")?["persistentVolumeClaim"]["claimName"],
            "claimName",
        )?;
        let pvc = of_kind(&docs, "PersistentVolumeClaim")?;
        assert_eq!(pvc["metadata"]["name"].as_str(), Some(claim), "{file}");
        assert_eq!(pvc["spec"]["volumeMode"].as_str(), Some("Block"), "{file}");
        for (volume, path) in [("keys", "/keys"), ("tmp", "/tmp")] {
            let mount = named(&container["volumeMounts"], volume)?;
            assert_eq!(mount["mountPath"].as_str(), Some(path), "{file}");
        }
        let keys = &named(&spec["volumes"], "keys")?["secret"];
        assert_eq!(keys["defaultMode"].as_u64(), Some(0o600), "{file}");
        secrets.push(str_of(&keys["secretName"], "secretName")?.to_owned());
        let tmp = &named(&spec["volumes"], "tmp")?["emptyDir"];
        assert_eq!(tmp["medium"].as_str(), Some("Memory"), "{file}");
        // The pod's user is the image's, and the mover pod's security context.
        let context = &spec["securityContext"];
        for key in ["runAsUser", "runAsGroup"] {
            assert_eq!(context[key].as_u64(), Some(UID.into()), "{file}: {key}");
        }
        let context = &container["securityContext"];
        assert_eq!(context["readOnlyRootFilesystem"].as_bool(), Some(true));
        assert_eq!(context["allowPrivilegeEscalation"].as_bool(), Some(false));
        assert_eq!(context["capabilities"]["drop"][0].as_str(), Some("ALL"));
        assert_eq!(spec["restartPolicy"].as_str(), Some("Never"), "{file}");

        if file == "destination.yaml" {
            // The Service selects the Job's pods and sends port 8000 (server.sh's LISTEN_PORT) to the container.
            let service = of_kind(&docs, "Service")?;
            let selector = service["spec"]["selector"]
                .as_mapping()
                .context("selector")?;
            for (key, value) in selector {
                assert_eq!(
                    template["metadata"]["labels"].get(key),
                    Some(value),
                    "the Service selects {key:?}, which the Job's pods do not carry"
                );
            }
            let port = named(&service["spec"]["ports"], "rsync-tls")?;
            let container_port = named(&container["ports"], "rsync-tls")?;
            assert_eq!(port["targetPort"], container_port["containerPort"]);
            assert_eq!(container_port["containerPort"].as_u64(), Some(8000));
            assert_eq!(port["port"].as_u64(), Some(8000));
        } else {
            // The source sends to the destination's Service, on its port.
            let address = str_of(
                &named(&container["env"], "DESTINATION_ADDRESS")?["value"],
                "DESTINATION_ADDRESS",
            )?;
            let service = example("destination.yaml")?;
            let service = str_of(&of_kind(&service, "Service")?["metadata"]["name"], "name")?;
            assert_eq!(address.split('.').next(), Some(service));
            let port = named(&container["env"], "DESTINATION_PORT")?;
            assert_eq!(port["value"].as_str(), Some("8000"));
            assert_eq!(
                named(&spec["volumes"], "data")?["persistentVolumeClaim"]["readOnly"].as_bool(),
                Some(true),
                "the source only reads its snapshot"
            );
        }
    }
    assert_eq!(
        secrets[0], secrets[1],
        "the two sides use different key Secrets"
    );
    Ok(())
}
