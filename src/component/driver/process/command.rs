//! The command line of a start: a manifest's templates expanded, or (the
//! generic simulator) the start's own executable and arguments, gated by
//! the component's whitelist, shell permission and environment policy.
//! Pure: every refusal is a clear error, nothing runs here.

use regex::Regex;
use serde_json::{Map, Value};
use std::path::Path;

use crate::component::kinds::{ArgItem, ProcessSpec, Stdin, placeholders};
use crate::protocol::{ActionRequest, ErrorInfo};

/// A fully resolved command line.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct CommandLine {
    pub program: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    pub stdout_logfile: Option<String>,
    pub stdin: Option<Vec<u8>>,
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn env_pairs(v: Option<&Value>) -> Vec<(String, String)> {
    match v {
        Some(Value::Object(m)) => m.iter().filter_map(|(k, v)| Some((k.clone(), scalar(v)?))).collect(),
        Some(Value::Array(a)) => {
            a.iter().filter_map(|i| i.as_str()?.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned()))).collect()
        }
        _ => Vec::new(),
    }
}

/// Expand `{{start.KEY}}` / `{{properties.KEY}}`; `None` if one has no value.
fn expand(t: &str, start: &Map<String, Value>, props: &Map<String, Value>) -> Option<String> {
    let mut out = t.to_owned();
    for name in placeholders(t) {
        let value = match name.split_once('.') {
            Some(("start", k)) => start.get(k).and_then(scalar),
            Some(("properties", k)) => props.get(k).and_then(scalar),
            _ => None,
        }?;
        out = out.replacen(&format!("{{{{{name}}}}}"), &value, 1);
        // Tolerate spaces inside the braces as placeholders() does.
        out = out.replace(&format!("{{{{ {name} }}}}"), &value);
    }
    Some(out)
}

/// Resolve the command of a start; every refusal is a clear error.
pub(super) fn command_line(
    spec: &ProcessSpec,
    req: &ActionRequest,
    props: &Map<String, Value>,
) -> Result<CommandLine, ErrorInfo> {
    let p = &req.parameters;
    let stdin = match spec.stdin {
        Stdin::None => None,
        Stdin::Parameters => Some(serde_json::to_vec(&Value::Object(p.clone())).unwrap_or_default()),
        Stdin::Payload => Some(serde_json::to_vec(&Value::Object(req.payload.clone())).unwrap_or_default()),
    };
    if !spec.from_parameters {
        let program = spec.executable.clone().unwrap_or_default();
        let mut args = Vec::new();
        for item in &spec.argv {
            match item {
                ArgItem::One(t) => args.push(expand(t, p, props).ok_or_else(|| {
                    ErrorInfo::new("Missing parameter for the command line").with("template", t.as_str())
                })?),
                ArgItem::Group(g) => {
                    if let Some(expanded) = g.iter().map(|t| expand(t, p, props)).collect::<Option<Vec<_>>>() {
                        args.extend(expanded);
                    }
                }
            }
        }
        let env = spec.environment.iter().filter_map(|(k, t)| Some((k.clone(), expand(t, p, props)?))).collect();
        return Ok(CommandLine { program, args, env, cwd: None, stdout_logfile: None, stdin });
    }
    // The generic simulator: the start parameters choose, the properties gate.
    let executable = p.get("executable").and_then(Value::as_str).unwrap_or_default().to_owned();
    crate::sandbox::check_executable(&executable)?;
    let argv: Vec<String> =
        p.get("argv").and_then(Value::as_array).map(|a| a.iter().filter_map(scalar).collect()).unwrap_or_default();
    let patterns: Vec<&str> = props
        .get("whitelist")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let allowed =
        patterns.iter().any(|pat| Regex::new(&format!("^(?:{pat})")).is_ok_and(|re| re.is_match(&executable)));
    if !allowed {
        return Err(ErrorInfo::new("Executable is not whitelisted for this simulator").with("executable", executable));
    }
    let (program, args) = if p.get("shell").and_then(Value::as_bool).unwrap_or(false) {
        if props.get("shell").and_then(Value::as_bool) != Some(true) {
            return Err(ErrorInfo::new("Shell execution is not allowed for this simulator"));
        }
        // The executable is quoted: it is what the whitelist allowed, so it
        // must be the program the shell runs (`/bin/echo; rm -rf /` would
        // otherwise pass a `^/bin/echo` whitelist), and a path with spaces
        // stays one word. The arguments stay shell syntax, as the component
        // allows a shell.
        let line = std::iter::once(shell_quote(&executable)).chain(argv).collect::<Vec<_>>().join(" ");
        ("/bin/sh".to_owned(), vec!["-c".to_owned(), line])
    } else {
        (executable, argv)
    };
    let env = env_pairs(p.get("environment"));
    crate::sandbox::check_env(&env, props)?;
    // Checked here against any base (they must be relative and plain), and
    // again against the real run directory once it exists.
    let path = |key: &str| -> Result<Option<String>, ErrorInfo> {
        match p.get(key).and_then(Value::as_str) {
            Some(rel) => crate::sandbox::confine(Path::new("/"), rel, key).map(|_| Some(rel.to_owned())),
            None => Ok(None),
        }
    };
    Ok(CommandLine {
        program,
        args,
        env,
        cwd: path("working_directory")?,
        stdout_logfile: path("stdout_logfile")?,
        stdin,
    })
}

/// `s` as one POSIX shell word.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn req(params: Value) -> ActionRequest {
        ActionRequest::new("start", params.as_object().unwrap().clone())
    }

    fn props(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn the_generic_simulator_runs_only_whitelisted_executables() {
        let spec = ProcessSpec { from_parameters: true, ..Default::default() };
        let p = props(json!({"whitelist": ["/bin/echo", "^/usr/bin/t"]}));
        let ok = command_line(&spec, &req(json!({"executable": "/bin/echo", "argv": ["hi", 3, true]})), &p).unwrap();
        assert_eq!(ok.program, "/bin/echo");
        assert_eq!(ok.args, ["hi", "3", "true"]);
        assert!(command_line(&spec, &req(json!({"executable": "/usr/bin/true"})), &p).is_ok());
        let e = command_line(&spec, &req(json!({"executable": "/bin/rm"})), &p).unwrap_err();
        assert_eq!(e.msg(), "Executable is not whitelisted for this simulator");
        // Anchored at the start, like Python's re.match.
        assert!(command_line(&spec, &req(json!({"executable": "/tmp/bin/echo"})), &p).is_err());
        // No whitelist: nothing runs.
        assert!(command_line(&spec, &req(json!({"executable": "/bin/echo"})), &Map::new()).is_err());
    }

    #[test]
    fn a_shell_needs_the_components_permission() {
        let spec = ProcessSpec { from_parameters: true, ..Default::default() };
        let r = req(json!({"executable": "echo", "argv": ["a", "b"], "shell": true}));
        let e = command_line(&spec, &r, &props(json!({"whitelist": ["echo"]}))).unwrap_err();
        assert!(e.msg().starts_with("Shell execution is not allowed"));
        let ok = command_line(&spec, &r, &props(json!({"whitelist": ["echo"], "shell": true}))).unwrap();
        assert_eq!((ok.program.as_str(), ok.args.clone()), ("/bin/sh", vec!["-c".to_owned(), "'echo' a b".to_owned()]));
        // The whitelisted executable is one word: it cannot smuggle a command.
        let sneaky = req(json!({"executable": "echo; touch /tmp/x", "shell": true}));
        let ok = command_line(&spec, &sneaky, &props(json!({"whitelist": ["echo"], "shell": true}))).unwrap();
        assert_eq!(ok.args[1], "'echo; touch /tmp/x'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn environment_accepts_a_map_or_a_list() {
        assert_eq!(env_pairs(Some(&json!({"A": "1", "B": 2}))), [("A".into(), "1".into()), ("B".into(), "2".into())]);
        assert_eq!(
            env_pairs(Some(&json!(["A=1", "B=x=y", "bad"]))),
            [("A".into(), "1".into()), ("B".into(), "x=y".into())]
        );
    }

    #[test]
    fn manifest_templates_expand_and_optional_groups_drop_out() {
        let spec = ProcessSpec {
            executable: Some("dpsim".into()),
            argv: vec![
                ArgItem::Group(vec!["--name".into(), "{{start.name}}".into()]),
                ArgItem::Group(vec!["--duration".into(), "{{start.duration}}".into()]),
                ArgItem::One("{{properties.script}}".into()),
            ],
            ..Default::default()
        };
        let c = command_line(&spec, &req(json!({"name": "sim"})), &props(json!({"script": "x.py"}))).unwrap();
        assert_eq!(c.args, ["--name", "sim", "x.py"]);
        let e = command_line(&spec, &req(json!({"name": "sim"})), &Map::new()).unwrap_err();
        assert_eq!(e.msg(), "Missing parameter for the command line");
    }
}
