//! `#[singleton]`: from an `async fn(ctx: SingletonContext<S>) -> Result<(), E>`
//! to a type implementing `flotilla::Singleton`.
//!
//! The function is emitted as written; a unit struct named after it in
//! CamelCase (`nightly_report` → `NightlyReport`) is added, with the
//! `Singleton` impl that calls it. The cron pattern, timezone and durations
//! are checked here, at compile time, each error on its own token.

use std::time::Duration;

use proc_macro2::TokenStream;
use quote::{format_ident, quote};
use syn::{FnArg, GenericArgument, ItemFn, LitStr, Pat, PathArguments, ReturnType, Type};

use crate::errors::Errors;
use crate::options::{Seen, option_key, parse_list, string_value, value};
use crate::{duration, private};

const SINGLETON_OPTIONS: &str = "`name`, `cron`, `timezone`, `skip_if_older_than`, `state`";

/// `#[singleton(...)]` options.
#[derive(Default)]
struct Options {
    name: Option<LitStr>,
    cron: Option<LitStr>,
    timezone: Option<LitStr>,
    skip_if_older_than: Option<Duration>,
    state: Option<Type>,
}

/// Expands `#[singleton(attr)] item`.
pub(crate) fn expand(attr: TokenStream, item: TokenStream) -> TokenStream {
    let mut errors = Errors::new();
    let options = parse_options(attr, &mut errors);
    let function = match syn::parse2::<ItemFn>(item.clone()) {
        Ok(function) => function,
        Err(_) => {
            errors.error_spanned_by(
                &item,
                "`#[singleton]` goes on an `async fn(ctx: SingletonContext) -> Result<(), E>`",
            );
            let error = errors.finish().err().map(|e| e.to_compile_error());
            return quote!(#error #item);
        }
    };
    let context_state = check_signature(&function, &mut errors);
    match errors.finish() {
        Ok(()) => generate(&options, &function, context_state),
        Err(error) => {
            let error = error.to_compile_error();
            quote!(#error #function)
        }
    }
}

fn parse_options(args: TokenStream, errors: &mut Errors) -> Options {
    let mut options = Options::default();
    let mut seen = Seen::default();
    for meta in parse_list(args, errors) {
        let Some(key) = option_key(&meta, "singleton", SINGLETON_OPTIONS, errors) else {
            continue;
        };
        if !seen.first(&key, errors) {
            continue;
        }
        match key.to_string().as_str() {
            "name" => {
                if let Some(lit) = string_value(&meta, "name = \"nightly-report\"", errors) {
                    if lit.value().trim().is_empty() {
                        errors.error_spanned_by(&lit, "`name` cannot be empty");
                    } else {
                        options.name = Some(lit);
                    }
                }
            }
            "cron" => {
                if let Some(lit) = string_value(&meta, "cron = \"0 */5 * * * *\"", errors) {
                    match check_cron(&lit.value()) {
                        Ok(()) => options.cron = Some(lit),
                        Err(reason) => errors.error_spanned_by(&lit, reason),
                    }
                }
            }
            "timezone" => {
                if let Some(lit) = string_value(&meta, "timezone = \"Europe/Paris\"", errors) {
                    if lit.value().parse::<chrono_tz::Tz>().is_ok() {
                        options.timezone = Some(lit);
                    } else {
                        errors.error_spanned_by(
                            &lit,
                            format!(
                                "unknown timezone {:?}: use an IANA name like \"Europe/Paris\" or \
                                 \"America/New_York\"",
                                lit.value()
                            ),
                        );
                    }
                }
            }
            "skip_if_older_than" => {
                if let Some(lit) = string_value(&meta, "skip_if_older_than = \"5m\"", errors) {
                    match duration::parse("skip_if_older_than", &lit) {
                        Ok(d) => options.skip_if_older_than = Some(d),
                        Err(error) => errors.push(error),
                    }
                }
            }
            "state" => {
                if let Some(value) = value(&meta, "state = MyState", errors) {
                    match value {
                        syn::Expr::Path(path) if path.qself.is_none() => {
                            options.state = Some(Type::Path(syn::TypePath {
                                qself: None,
                                path: path.path.clone(),
                            }));
                        }
                        _ => errors.error_spanned_by(
                            value,
                            "`state` names the state type: `state = MyState`",
                        ),
                    }
                }
            }
            other => errors.error_spanned_by(
                &key,
                format!(
                    "unknown singleton option `{other}`; valid options are {SINGLETON_OPTIONS}"
                ),
            ),
        }
    }
    if options.cron.is_none()
        && let Some(timezone) = &options.timezone
    {
        errors.error_spanned_by(
            timezone,
            "`timezone` only applies to a cron singleton: add `cron = \"...\"`",
        );
    }
    options
}

/// Checks a pattern as the runtime parses it: 5 fields (minute to weekday),
/// 6 (seconds first), or an `@daily`-style nickname.
fn check_cron(pattern: &str) -> Result<(), String> {
    let fields = pattern.split_whitespace().count();
    let nickname = pattern.trim_start().starts_with('@');
    if !nickname && !(5..=6).contains(&fields) {
        return Err(format!(
            "invalid cron pattern {pattern:?}: expected 5 fields (minute hour day month weekday) \
             or 6 (with seconds first), found {fields}"
        ));
    }
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Optional)
        .year(croner::parser::Year::Disallowed)
        .build()
        .parse(pattern)
        .map(|_| ())
        .map_err(|error| format!("invalid cron pattern {pattern:?}: {error}"))
}

/// Checks `async fn name(ctx: SingletonContext<S>) -> Result<(), E>`;
/// returns `S` when the context type names it.
fn check_signature(function: &ItemFn, errors: &mut Errors) -> Option<Type> {
    const SHAPE: &str = "a singleton is an `async fn(ctx: SingletonContext<S>) -> Result<(), E>`";
    let sig = &function.sig;
    if sig.asyncness.is_none() {
        errors.error_spanned_by(
            sig.fn_token,
            format!("`#[singleton]` needs an `async fn`: {SHAPE}"),
        );
    }
    if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
        errors.error_spanned_by(
            &sig.generics,
            format!("a singleton cannot be generic: {SHAPE}"),
        );
    }
    let mut state = None;
    let inputs: Vec<&FnArg> = sig.inputs.iter().collect();
    match inputs.as_slice() {
        [FnArg::Typed(arg)] => {
            if !matches!(&*arg.pat, Pat::Ident(_) | Pat::Wild(_)) {
                errors.error_spanned_by(&arg.pat, format!("bind the context to a name: {SHAPE}"));
            }
            match context_argument(&arg.ty) {
                Some(inner) => state = inner,
                None => errors.error_spanned_by(
                    &arg.ty,
                    format!("the argument must be a `SingletonContext`: {SHAPE}"),
                ),
            }
        }
        [FnArg::Receiver(receiver)] => errors.error_spanned_by(
            receiver,
            format!("a singleton is a free function, not a method: {SHAPE}"),
        ),
        _ => errors.push(syn::Error::new(
            sig.paren_token.span.join(),
            format!("expected exactly one argument, the context: {SHAPE}"),
        )),
    }
    match &sig.output {
        ReturnType::Type(_, ty) if returns_result(ty) => {}
        ReturnType::Type(_, ty) => {
            errors.error_spanned_by(ty, format!("the function must return a `Result`: {SHAPE}"))
        }
        ReturnType::Default => errors.error_spanned_by(
            &sig.ident,
            format!("the function must return `Result<(), E>`: {SHAPE}"),
        ),
    }
    state
}

/// `SingletonContext` or `SingletonContext<S>` (any path ending so):
/// `Some(state)` where `state` is `S` if given.
fn context_argument(ty: &Type) -> Option<Option<Type>> {
    let Type::Path(path) = ty else {
        return None;
    };
    let last = path.path.segments.last()?;
    if last.ident != "SingletonContext" {
        return None;
    }
    match &last.arguments {
        PathArguments::None => Some(None),
        PathArguments::AngleBracketed(args) => {
            match args.args.iter().collect::<Vec<_>>().as_slice() {
                [GenericArgument::Type(state)] => Some(Some(state.clone())),
                _ => None,
            }
        }
        PathArguments::Parenthesized(_) => None,
    }
}

fn returns_result(ty: &Type) -> bool {
    match ty {
        Type::Path(path) => path
            .path
            .segments
            .last()
            .is_some_and(|s| s.ident == "Result"),
        _ => false,
    }
}

/// `nightly_report` → `NightlyReport`.
fn camel_case(name: &str) -> String {
    name.split('_')
        .filter(|part| !part.is_empty())
        .map(|part| {
            let mut chars = part.chars();
            match chars.next() {
                Some(first) => first.to_uppercase().chain(chars).collect::<String>(),
                None => String::new(),
            }
        })
        .collect()
}

fn generate(options: &Options, function: &ItemFn, context_state: Option<Type>) -> TokenStream {
    let private = private();
    let fn_ident = &function.sig.ident;
    let vis = &function.vis;
    let raw = fn_ident.to_string();
    let raw = raw.strip_prefix("r#").unwrap_or(&raw);
    let type_ident = format_ident!("{}", camel_case(raw), span = fn_ident.span());
    let name = options
        .name
        .clone()
        .unwrap_or_else(|| LitStr::new(raw, fn_ident.span()));
    let state = options
        .state
        .clone()
        .or(context_state)
        .unwrap_or_else(|| syn::parse_quote!(()));
    let cron = match &options.cron {
        Some(cron) => quote!(#private::Option::Some(#cron)),
        None => quote!(#private::Option::None),
    };
    let timezone = match &options.timezone {
        Some(tz) => quote!(#private::Option::Some(#tz)),
        None => quote!(#private::Option::None),
    };
    let skip = match options.skip_if_older_than {
        Some(d) => duration::to_tokens(d),
        None => quote!(#private::SingletonOptions::DEFAULT.skip_if_older_than),
    };
    let doc = format!(
        "The singleton `{}` run by [`{raw}`]; register it with \
         `Cluster::builder().singleton::<{type_ident}>()`.",
        name.value()
    );
    quote! {
        #function

        #[doc = #doc]
        #[derive(Debug, Clone, Copy, Default)]
        #vis struct #type_ident;

        impl #private::Singleton for #type_ident {
            const NAME: &'static str = #name;
            type State = #state;

            fn options() -> #private::SingletonOptions {
                #private::SingletonOptions {
                    cron: #cron,
                    timezone: #timezone,
                    skip_if_older_than: #skip,
                }
            }

            fn run(ctx: #private::SingletonContext<Self::State>) -> #private::SingletonFuture {
                #private::Box::pin(async move {
                    #fn_ident(ctx)
                        .await
                        .map_err(|error| #private::singleton_error(&error))
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors_of(attr: TokenStream, item: TokenStream) -> Vec<String> {
        let out = expand(attr, item).to_string();
        out.split("compile_error !")
            .skip(1)
            .map(|s| s.split('"').nth(1).unwrap_or_default().to_owned())
            .collect()
    }

    #[test]
    fn camel_case_of_snake_names() {
        assert_eq!(camel_case("nightly_report"), "NightlyReport");
        assert_eq!(camel_case("tick"), "Tick");
        assert_eq!(camel_case("a__b_"), "AB");
    }

    #[test]
    fn cron_patterns_are_checked() {
        assert!(check_cron("*/5 * * * *").is_ok());
        assert!(check_cron("0 */5 * * * *").is_ok());
        assert!(check_cron("@hourly").is_ok());
        assert!(check_cron("* * * *").unwrap_err().contains("found 4"));
        assert!(check_cron("99 * * * *").is_err());
        assert!(check_cron("0 0 0 1 1 * 2030").is_err());
    }

    #[test]
    fn a_good_singleton_expands_without_errors() {
        let out = expand(
            quote!(
                cron = "*/5 * * * * *",
                timezone = "Europe/Paris",
                skip_if_older_than = "5m",
                state = Count
            ),
            quote!(
                async fn nightly_report(ctx: SingletonContext<Count>) -> Result<(), String> {
                    Ok(())
                }
            ),
        )
        .to_string();
        assert!(!out.contains("compile_error"), "{out}");
        assert!(out.contains("struct NightlyReport"), "{out}");
        assert!(out.contains("\"nightly_report\""), "{out}");
        assert!(out.contains("from_secs (300u64)"), "{out}");
    }

    #[test]
    fn every_problem_is_reported() {
        let errors = errors_of(
            quote!(cron = "every day", timezone = "Mars/Olympus", every = 3),
            quote!(
                fn f(a: u32, b: u32) {}
            ),
        );
        assert_eq!(errors.len(), 6, "{errors:?}");
    }
}
