//! Attribute `expression`s, as iotagent-node-lib evaluates them: JEXL
//! (the `jexl-eval` crate, Mozilla's) over a context of the measure's
//! values (by key and by attribute name), the static attributes and the
//! device's identity, with the transforms the FIWARE tutorials use.
//!
//! One difference from JavaScript's JEXL: `+` does not turn a number into
//! text (`'T=' + t` is an error); write `'T=' + t|tostring`.
//!
//! Pure: no I/O, no clock. A provisioned expression that does not parse is
//! refused at provisioning (`INVALID_EXPRESSION`); one that fails on a
//! measure (an attribute the measure lacks) leaves its attribute out of
//! that measure, as upstream does.

use jexl_eval::Evaluator;
use serde_json::{Map, Value};
use std::sync::LazyLock;

/// Longest expression, in bytes.
pub const MAX_EXPRESSION_BYTES: usize = 1024;

/// Most operators and brackets in an expression. The parser and the
/// evaluator recurse once per level, so this bounds their stack: 200
/// chained `+` overflow a 2 MiB thread stack in a debug build; the
/// tutorials' expressions use fewer than ten.
pub const MAX_OPERATORS: usize = 48;

/// Operators and opening brackets outside string literals.
fn operators(expr: &str) -> usize {
    let mut quote: Option<char> = None;
    let mut escaped = false;
    let mut n = 0;
    for c in expr.chars() {
        match quote {
            Some(q) => {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == q {
                    quote = None;
                }
            }
            None => match c {
                '\'' | '"' => quote = Some(c),
                '+' | '-' | '*' | '/' | '%' | '<' | '>' | '=' | '!' | '&' | '|' | '?' | ':' | '(' | '[' | '{' | '.'
                | ',' | '^' => n += 1,
                _ => {}
            },
        }
    }
    n
}

fn text(args: &[Value], i: usize) -> String {
    match args.get(i) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

fn number(args: &[Value], i: usize) -> Result<f64, anyhow::Error> {
    args.get(i).and_then(Value::as_f64).ok_or_else(|| anyhow::anyhow!("argument {i} must be a number"))
}

/// A JSON number, integral when it is (JavaScript prints `68`, not `68.0`).
fn num(v: f64) -> Value {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 9.0e15 {
        Value::from(v as i64)
    } else {
        serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number)
    }
}

static EVALUATOR: LazyLock<Evaluator<'static>> = LazyLock::new(|| {
    Evaluator::new()
        .with_transform("toUpperCase", |a: &[Value]| Ok(text(a, 0).to_uppercase().into()))
        .with_transform("touppercase", |a: &[Value]| Ok(text(a, 0).to_uppercase().into()))
        .with_transform("toLowerCase", |a: &[Value]| Ok(text(a, 0).to_lowercase().into()))
        .with_transform("tolowercase", |a: &[Value]| Ok(text(a, 0).to_lowercase().into()))
        .with_transform("trim", |a: &[Value]| Ok(text(a, 0).trim().into()))
        .with_transform("tostring", |a: &[Value]| Ok(text(a, 0).into()))
        .with_transform("tojson", |a: &[Value]| Ok(serde_json::from_str(&text(a, 0)).unwrap_or(Value::Null)))
        .with_transform("length", |a: &[Value]| {
            Ok(match a.first() {
                Some(Value::Array(x)) => x.len().into(),
                _ => text(a, 0).chars().count().into(),
            })
        })
        .with_transform("substr", |a: &[Value]| {
            let s: Vec<char> = text(a, 0).chars().collect();
            let start = (number(a, 1)?.max(0.0) as usize).min(s.len());
            let end = a.get(2).and_then(Value::as_f64).map_or(s.len(), |e| (e.max(0.0) as usize).min(s.len()));
            Ok(s[start..end.max(start)].iter().collect::<String>().into())
        })
        .with_transform("indexOf", |a: &[Value]| {
            let (s, needle) = (text(a, 0), text(a, 1));
            Ok(s.find(&needle).map_or(-1, |b| s[..b].chars().count() as i64).into())
        })
        .with_transform("includes", |a: &[Value]| Ok(text(a, 0).contains(&text(a, 1)).into()))
        .with_transform("replacestr", |a: &[Value]| Ok(text(a, 0).replace(&text(a, 1), &text(a, 2)).into()))
        .with_transform("split", |a: &[Value]| {
            let parts: Vec<Value> = text(a, 0).split(&text(a, 1)).map(|p| Value::String(p.into())).collect();
            Ok(parts.into())
        })
        .with_transform("floor", |a: &[Value]| Ok(num(number(a, 0)?.floor())))
        .with_transform("ceil", |a: &[Value]| Ok(num(number(a, 0)?.ceil())))
        .with_transform("round", |a: &[Value]| Ok(num(number(a, 0)?.round())))
        .with_transform("tofixed", |a: &[Value]| {
            let digits = a.get(1).and_then(Value::as_f64).unwrap_or(0.0).clamp(0.0, 20.0) as usize;
            Ok(format!("{:.*}", digits, number(a, 0)?).into())
        })
        .with_transform("typeof", |a: &[Value]| {
            Ok(match a.first() {
                Some(Value::Number(_)) => "Number",
                Some(Value::String(_)) => "String",
                Some(Value::Bool(_)) => "Boolean",
                Some(Value::Array(_)) => "Array",
                Some(Value::Object(_)) => "Object",
                _ => "Null",
            }
            .into())
        })
});

/// Run the third-party parser and evaluator so that a panic of theirs on
/// some input we did not foresee is an error for that expression, not a
/// lost request or measure.
fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .map_err(|p| format!("the expression could not be evaluated: {}", crate::supervise::panic_message(p)))
}

/// Check an expression as provisioned: not too long, and it parses.
pub fn check(expr: &str) -> Result<(), String> {
    if expr.len() > MAX_EXPRESSION_BYTES {
        return Err(format!("an expression is at most {MAX_EXPRESSION_BYTES} bytes"));
    }
    // jexl-parser 0.4's lexer panics on any character outside ASCII, in a
    // string literal too (it slices inside the character; found by
    // `fuzz/expression`).
    if !expr.is_ascii() {
        return Err("an expression is ASCII only".into());
    }
    if operators(expr) > MAX_OPERATORS {
        return Err(format!("an expression has at most {MAX_OPERATORS} operators and brackets"));
    }
    let parsed = guarded(|| match EVALUATOR.eval_in_context(expr, Value::Object(Map::new())) {
        Err(e @ jexl_eval::error::EvaluationError::ParseError(_)) => Err(format!("invalid expression {expr:?}: {e}")),
        _ => Ok(()),
    });
    parsed.and_then(|r| r)
}

/// Evaluate `expr` in `context`. Floats that are whole become integers.
pub fn evaluate(expr: &str, context: &Map<String, Value>) -> Result<Value, String> {
    // Checked at provisioning; checked again here, since a stored device
    // may predate a limit.
    if expr.len() > MAX_EXPRESSION_BYTES || !expr.is_ascii() || operators(expr) > MAX_OPERATORS {
        return Err("the expression is too long or too deep".into());
    }
    // jexl-eval takes the context by value; only expressions pay for it.
    let v = guarded(|| EVALUATOR.eval_in_context(expr, Value::Object(context.clone())).map_err(|e| e.to_string()))??;
    Ok(match v {
        Value::Number(n) if n.is_f64() => n.as_f64().map_or(Value::Number(n), num),
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn the_tutorials_expressions_evaluate_as_upstream() {
        let c = ctx(json!({"t": 20, "name": " Lab B ", "loc": "52.5,13.4", "n": 2.5}));
        assert_eq!(evaluate("t*9/5+32", &c), Ok(json!(68)));
        assert_eq!(evaluate("n*2", &c), Ok(json!(5)));
        assert_eq!(evaluate("n/2", &c), Ok(json!(1.25)));
        assert_eq!(evaluate("t > 10", &c), Ok(json!(true)));
        assert_eq!(evaluate("name|trim|toUpperCase", &c), Ok(json!("LAB B")));
        assert_eq!(evaluate("'T=' + t|tostring", &c), Ok(json!("T=20")));
        assert!(evaluate("'T=' + t", &c).is_err(), "no implicit conversion, unlike JavaScript (README)");
        assert_eq!(evaluate("loc|substr(0, loc|indexOf(','))", &c), Ok(json!("52.5")));
        assert_eq!(evaluate("loc|split(',')", &c), Ok(json!(["52.5", "13.4"])));
        assert_eq!(evaluate("n|round", &c), Ok(json!(3)));
        assert_eq!(evaluate("n|tofixed(2)", &c), Ok(json!("2.50")));
        assert!(evaluate("missing*2", &c).is_err(), "an attribute the measure lacks");
        assert!(evaluate("t|nosuchtransform", &c).is_err());
    }

    #[test]
    fn provisioned_expressions_must_parse() {
        assert!(check("t*9/5+32").is_ok());
        assert!(check("unknown_at_provisioning * 2").is_ok());
        assert!(check("t * (").is_err());
        assert!(check(&"1+".repeat(600)).is_err());
        // jexl-parser's lexer panics on these (found by fuzz/expression).
        assert_eq!(check("\u{1ab}"), Err("an expression is ASCII only".into()));
        assert!(check("t + ä").is_err());
        assert!(check("'ä' + t|tostring").is_err(), "in a string literal too");
        assert!(evaluate("'ä'", &Map::new()).is_err());
        // A panic of the parser on something else would be an error too.
        assert!(guarded(|| -> () { panic!("boom") }).unwrap_err().contains("boom"));
    }

    #[test]
    fn the_deepest_expression_that_fits_does_not_exhaust_a_stack() {
        // Run on a thread with tokio's worker stack size (2 MiB).
        let deep = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(|| {
                let n = MAX_OPERATORS;
                let nested = format!("{}1{}", "(".repeat(n), ")".repeat(n));
                assert!(check(&nested).is_ok());
                assert_eq!(evaluate(&nested, &Map::new()), Ok(Value::from(1)));
                let chain = format!("{}1", "1+".repeat(n));
                assert_eq!(evaluate(&chain, &Map::new()), Ok(Value::from(n as i64 + 1)));
                for op in ["!", "-", "[", "{a:", "a."] {
                    let _ = evaluate(&format!("{}1", op.repeat(n)), &Map::new());
                }
                let _ = evaluate(&format!("{}1{}", "[".repeat(n), "]".repeat(n)), &Map::new());
                // One more is refused before it is parsed.
                assert!(check(&format!("{}1", "1+".repeat(n + 1))).is_err());
                assert!(evaluate(&format!("{}1", "1+".repeat(200)), &Map::new()).is_err());
                // Operators inside strings do not count.
                assert!(check(&format!("'{}'", "+".repeat(500))).is_ok());
            })
            .unwrap()
            .join();
        assert!(deep.is_ok(), "evaluating the deepest allowed expression overflowed the stack");
    }
}
