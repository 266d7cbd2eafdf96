//! CEL as the Kubernetes API server runs `x-kubernetes-validations`: the
//! standard library, cel-go's strings extension, and the Kubernetes URL
//! library (`isURL`, `url`, `getScheme`, ...), which the `cel` crate lacks.
//! Rules are checked when loaded: a rule that does not parse, calls a function
//! this environment does not declare, or names a variable other than `self`
//! (or `oldSelf`) is an error, as it would be when Kubernetes compiles the CRD.

use std::any::Any;
use std::collections::BTreeSet;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use cel::common::ast::{EntryExpr, Expr, IdedExpr, operators};
use cel::common::types::{CelBool, CelString, Kind, Type};
use cel::common::value::{StaticVal, Val};
use cel::objects::{Key, Map};
use cel::{Context, DeclarationError, Env, ExecutionError, Program, Value};

use crate::gourl::{self, GoUrl};

/// Builds the environment rules are compiled and run in.
pub(crate) fn kubernetes_env() -> Result<Arc<Env>, DeclarationError> {
    let mut env = Env::stdlib();
    env.add_extension(cel::extensions::strings)?;
    env.add_extension(url_library)?;
    Ok(Arc::new(env))
}

/// A compiled rule, ready to run.
pub(crate) struct Compiled {
    pub program: Program,
    /// Rules that read `oldSelf` only apply to updates ("transition rules");
    /// like Kubernetes on create, the validator skips them.
    pub transition: bool,
}

/// Compiles `source` and checks every function and variable it names.
pub(crate) fn compile(env: &Arc<Env>, source: &str) -> anyhow::Result<Compiled> {
    let program = env
        .compile(source)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("does not parse")?;
    let mut names = Names::default();
    names.walk(program.expression(), &mut Vec::new());
    for function in &names.functions {
        if !is_declared(env, function) {
            bail!("calls `{function}`, which no library declares");
        }
    }
    let mut transition = false;
    for variable in &names.free {
        match variable.as_str() {
            "self" => {}
            "oldSelf" => transition = true,
            v if TYPE_NAMES.contains(&v) => {}
            v => bail!("names `{v}`, which is not declared (only `self` and `oldSelf` are)"),
        }
    }
    Ok(Compiled {
        program,
        transition,
    })
}

/// Type names an expression may use as values (`type(x) == string`).
const TYPE_NAMES: &[&str] = &[
    "bool",
    "bytes",
    "double",
    "duration",
    "dyn",
    "int",
    "list",
    "map",
    "null_type",
    "string",
    "timestamp",
    "type",
    "uint",
];

/// Operators the interpreter evaluates itself rather than through overloads.
const OPERATORS: &[&str] = &[
    operators::CONDITIONAL,
    operators::LOGICAL_AND,
    operators::LOGICAL_OR,
    operators::LOGICAL_NOT,
    operators::SUBSTRACT,
    operators::ADD,
    operators::MULTIPLY,
    operators::DIVIDE,
    operators::MODULO,
    operators::EQUALS,
    operators::NOT_EQUALS,
    operators::GREATER_EQUALS,
    operators::LESS_EQUALS,
    operators::GREATER,
    operators::LESS,
    operators::NEGATE,
    operators::INDEX,
    operators::OPT_INDEX,
    operators::OPT_SELECT,
    operators::NOT_STRICTLY_FALSE,
    operators::IN,
];

fn is_declared(env: &Arc<Env>, function: &str) -> bool {
    if OPERATORS.contains(&function) {
        return true;
    }
    // The crate exposes no "is this name declared" query, but it refuses to
    // add a context function under a name its `Env` declares overloads for.
    let mut probe = Context::with_env(Arc::clone(env));
    probe.add_function(function, || true).is_err()
}

/// The functions an expression calls and the variables it reads without
/// binding them (comprehension variables are bound inside their loop).
#[derive(Default)]
struct Names {
    functions: BTreeSet<String>,
    free: BTreeSet<String>,
}

impl Names {
    fn walk(&mut self, expr: &IdedExpr, bound: &mut Vec<String>) {
        match &expr.expr {
            Expr::Unspecified | Expr::Literal(_) => {}
            Expr::Ident(name) => {
                if !bound.iter().any(|b| b == name) {
                    self.free.insert(name.clone());
                }
            }
            Expr::Select(select) => self.walk(&select.operand, bound),
            Expr::Call(call) => {
                self.functions.insert(call.func_name.clone());
                if let Some(target) = &call.target {
                    self.walk(target, bound);
                }
                for arg in &call.args {
                    self.walk(arg, bound);
                }
            }
            Expr::List(list) => {
                for element in &list.elements {
                    self.walk(element, bound);
                }
            }
            Expr::Map(map) => self.entries(map.entries.iter().map(|e| &e.expr), bound),
            Expr::Struct(s) => self.entries(s.entries.iter().map(|e| &e.expr), bound),
            Expr::Comprehension(c) => {
                self.walk(&c.iter_range, bound);
                self.walk(&c.accu_init, bound);
                let depth = bound.len();
                bound.push(c.accu_var.clone());
                self.walk(&c.result, bound);
                bound.push(c.iter_var.clone());
                bound.extend(c.iter_var2.clone());
                self.walk(&c.loop_cond, bound);
                self.walk(&c.loop_step, bound);
                bound.truncate(depth);
            }
        }
    }

    fn entries<'a>(
        &mut self,
        entries: impl Iterator<Item = &'a EntryExpr>,
        bound: &mut Vec<String>,
    ) {
        for entry in entries {
            match entry {
                EntryExpr::StructField(field) => self.walk(&field.value, bound),
                EntryExpr::MapEntry(entry) => {
                    self.walk(&entry.key, bound);
                    self.walk(&entry.value, bound);
                }
            }
        }
    }
}

/// Runs `program` with `self` bound to `value`.
pub(crate) fn run(
    env: &Arc<Env>,
    program: &Program,
    value: &Value,
) -> Result<Value, ExecutionError> {
    let mut context = Context::with_env(Arc::clone(env));
    context.add_variable_from_value("self", value.clone());
    program.execute(&context)
}

/// How a schema node types its value, for converting JSON to CEL as
/// Kubernetes does: an `integer` is a CEL `int`, a `number` a `double`
/// (even when written `5`), and object fields the schema does not know are
/// pruned before rules see the object.
pub(crate) trait CelShape {
    fn json_type(&self) -> Option<&str>;
    fn field(&self, name: &str) -> FieldShape<'_, Self>
    where
        Self: Sized;
    fn items(&self) -> Option<&Self>;
}

/// What a schema says about one object field.
pub(crate) enum FieldShape<'a, S> {
    Typed(&'a S),
    /// Kept, with no schema (`x-kubernetes-preserve-unknown-fields`).
    Untyped,
    /// Pruned.
    Unknown,
}

pub(crate) fn to_cel<S: CelShape>(value: &serde_json::Value, shape: Option<&S>) -> Value {
    use serde_json::Value as J;
    match value {
        J::Null => Value::Null,
        J::Bool(b) => Value::Bool(*b),
        J::Number(n) => {
            let as_double = shape.and_then(S::json_type) == Some("number");
            match (n.as_i64(), n.as_u64()) {
                (Some(i), _) if !as_double => Value::Int(i),
                (None, Some(u)) if !as_double => Value::UInt(u),
                _ => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
            }
        }
        J::String(s) => Value::String(Arc::new(s.clone())),
        J::Array(items) => {
            let item_shape = shape.and_then(S::items);
            Value::List(Arc::new(
                items.iter().map(|v| to_cel(v, item_shape)).collect(),
            ))
        }
        J::Object(fields) => {
            let mut map = std::collections::HashMap::new();
            for (name, v) in fields {
                let converted = match shape.map(|s| s.field(name)) {
                    None | Some(FieldShape::Untyped) => to_cel::<S>(v, None),
                    Some(FieldShape::Typed(field)) => to_cel(v, Some(field)),
                    Some(FieldShape::Unknown) => continue,
                };
                map.insert(Key::String(Arc::new(name.clone())), converted);
            }
            Value::Map(Map { map: Arc::new(map) })
        }
    }
}

// ---- Kubernetes URL library (k8s.io/apiserver/pkg/cel/library/urls.go) ----

static URL_TYPE: Type = Type::simple_type(Kind::Opaque, "kubernetes.URL");

/// A `kubernetes.URL` value.
#[derive(Debug)]
struct Url(GoUrl);

impl Val for Url {
    fn get_type(&self) -> &Type {
        &URL_TYPE
    }

    fn cel_type() -> &'static Type {
        &URL_TYPE
    }

    fn equals(&self, other: &dyn Val) -> bool {
        other.downcast_ref::<Url>().is_some_and(|o| o.0 == self.0)
    }

    fn clone_as_boxed<'v>(&self) -> Box<dyn Val + 'v> {
        Box::new(Url(self.0.clone()))
    }

    fn as_any(&self) -> Option<&dyn Any> {
        Some(self)
    }
}

impl StaticVal for Url {}

fn url_library(env: &mut Env) -> Result<(), DeclarationError> {
    env.add_type(Type::simple_type(Kind::Opaque, "kubernetes.URL"))?;
    cel::add_overload!(env, fn is_url: (CelString) -> CelBool, name = "isURL")?;
    cel::add_overload!(env, fn url: (CelString) -> Result<Url>, name = "url")?;
    cel::add_member_overload!(env, fn get_scheme: (Url) -> CelString, name = "getScheme")?;
    cel::add_member_overload!(env, fn get_host: (Url) -> CelString, name = "getHost")?;
    cel::add_member_overload!(env, fn get_hostname: (Url) -> CelString, name = "getHostname")?;
    cel::add_member_overload!(env, fn get_port: (Url) -> CelString, name = "getPort")?;
    Ok(())
}

/// `isURL(s)`: Go's `url.ParseRequestURI(s)` succeeds.
fn is_url(s: &CelString<'_>) -> CelBool {
    CelBool::from(gourl::parse_request_uri(s).is_ok())
}

/// `url(s)`: checked with `ParseRequestURI`, kept as `url.Parse` reads it
/// (which splits off a fragment where the former would not).
fn url(s: &CelString<'_>) -> Result<Url, ExecutionError> {
    gourl::parse_request_uri(s)
        .and_then(|_| gourl::parse(s))
        .map(Url)
        .map_err(|e| {
            ExecutionError::function_error(
                "url",
                format!("URL parse error during conversion from string: {e}"),
            )
        })
}

fn get_scheme(u: &Url) -> CelString<'static> {
    CelString::from(u.0.scheme.clone())
}

fn get_host(u: &Url) -> CelString<'static> {
    CelString::from(u.0.host.clone())
}

fn get_hostname(u: &Url) -> CelString<'static> {
    CelString::from(u.0.hostname().to_owned())
}

fn get_port(u: &Url) -> CelString<'static> {
    CelString::from(u.0.port().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval(expr: &str) -> Result<Value, ExecutionError> {
        let env = kubernetes_env().unwrap();
        let compiled = compile(&env, expr).unwrap();
        run(&env, &compiled.program, &Value::Null)
    }

    #[test]
    fn url_library_follows_go() {
        assert_eq!(
            eval("isURL('https://example.com/x')"),
            Ok(Value::Bool(true))
        );
        assert_eq!(eval("isURL('example.com')"), Ok(Value::Bool(false)));
        assert_eq!(
            eval("url('HTTPS://h:80/p#f').getScheme()"),
            Ok(Value::from("https"))
        );
        assert_eq!(
            eval("url('http://[::1]:80/').getHostname()"),
            Ok(Value::from("::1"))
        );
        assert_eq!(eval("url('http://h:80/').getPort()"), Ok(Value::from("80")));
        assert!(eval("url('not a url').getScheme()").is_err());
    }

    #[test]
    fn kubernetes_rules_run() {
        assert_eq!(
            eval("duration('300ms') >= duration('1ms')"),
            Ok(Value::Bool(true))
        );
        assert_eq!(
            eval("'unix:///a'.substring(7, 8) == '/'"),
            Ok(Value::Bool(true))
        );
        assert_eq!(
            eval("[1, 2].all(l1, [1, 2].exists_one(l2, l1 == l2))"),
            Ok(Value::Bool(true))
        );
        assert_eq!(eval("'abc'.matches('^a.c$')"), Ok(Value::Bool(true)));
    }

    #[test]
    fn unknown_functions_and_variables_fail_to_compile() {
        let env = kubernetes_env().unwrap();
        assert!(compile(&env, "self.size(").is_err());
        assert!(compile(&env, "noSuchFunction(self)").is_err());
        assert!(compile(&env, "self.noSuchMethod()").is_err());
        assert!(compile(&env, "other == 1").is_err());
        assert!(compile(&env, "self.all(k, k != '')").is_ok());
        assert!(compile(&env, "self == oldSelf").unwrap().transition);
    }
}
