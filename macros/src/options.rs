//! The options of `#[entity(...)]` and `#[rpc(...)]`.
//!
//! Every option is checked here, each problem recorded on its own token: an
//! unknown option lists the valid ones, a repeated one says it is "set
//! multiple times", a bad value says what to write instead.

use std::time::Duration;

use proc_macro2::TokenStream;
use syn::parse::Parser;
use syn::punctuated::Punctuated;
use syn::{Attribute, Expr, ExprLit, Ident, Lit, LitStr, Meta, Token};

use crate::duration;
use crate::errors::Errors;

/// `#[entity(name = "...", max_idle = "90s", mailbox = 4096, state = persisted)]`.
#[derive(Debug, Default)]
pub(crate) struct EntityOptions {
    /// The wire name; the type's name when `None`.
    pub(crate) name: Option<LitStr>,
    pub(crate) max_idle: Option<Duration>,
    pub(crate) mailbox: Option<usize>,
    pub(crate) persisted_state: bool,
}

/// `#[rpc]`, `#[rpc(persisted)]`, `#[rpc(persisted, primary_key = arg)]`.
#[derive(Debug, Default)]
pub(crate) struct RpcOptions {
    pub(crate) persisted: bool,
    /// The `primary_key = arg` option: the option's key token and the argument.
    pub(crate) primary_key: Option<(Ident, Ident)>,
}

const ENTITY_OPTIONS: &str = "`name`, `max_idle`, `mailbox`, `state`";
const RPC_OPTIONS: &str = "`persisted`, `primary_key`";

/// Parses the arguments of `#[entity(...)]`. Problems go to `errors`; the
/// options that were valid are kept.
pub(crate) fn parse_entity(args: TokenStream, errors: &mut Errors) -> EntityOptions {
    let mut options = EntityOptions::default();
    let mut seen = Seen::default();
    for meta in parse_list(args, errors) {
        let Some(key) = option_key(&meta, "entity", ENTITY_OPTIONS, errors) else {
            continue;
        };
        let name = key.to_string();
        if !seen.first(&key, errors) {
            continue;
        }
        match name.as_str() {
            "name" => {
                if let Some(lit) = string_value(&meta, "name = \"Account\"", errors) {
                    if lit.value().trim().is_empty() {
                        errors.error_spanned_by(&lit, "`name` cannot be empty");
                    } else {
                        options.name = Some(lit);
                    }
                }
            }
            "max_idle" => {
                if let Some(lit) = string_value(&meta, "max_idle = \"90s\"", errors) {
                    match duration::parse("max_idle", &lit) {
                        Ok(max_idle) => options.max_idle = Some(max_idle),
                        Err(error) => errors.push(error),
                    }
                }
            }
            "mailbox" => options.mailbox = mailbox_value(&meta, errors),
            "state" => {
                if let Some(value) = value(&meta, "state = persisted", errors) {
                    match expr_ident(value).map(ToString::to_string).as_deref() {
                        Some("persisted") => options.persisted_state = true,
                        Some("volatile") => options.persisted_state = false,
                        _ => errors.error_spanned_by(
                            value,
                            "`state` is `persisted` (saved with each persisted reply, loaded on \
                             activation) or `volatile` (the default): `state = persisted`",
                        ),
                    }
                }
            }
            _ => {
                let hint = match name.as_str() {
                    "persisted" | "volatile" => format!("; did you mean `state = {name}`?"),
                    _ => String::new(),
                };
                errors.error_spanned_by(
                    &key,
                    format!(
                        "unknown entity option `{name}`; valid options are {ENTITY_OPTIONS}{hint}"
                    ),
                );
            }
        }
    }
    options
}

/// Parses one `#[rpc]` attribute.
pub(crate) fn parse_rpc(attr: &Attribute, errors: &mut Errors) -> RpcOptions {
    let mut options = RpcOptions::default();
    let args = match &attr.meta {
        Meta::Path(_) => return options,
        Meta::List(list) => list.tokens.clone(),
        Meta::NameValue(name_value) => {
            errors.error_spanned_by(
                name_value,
                "`#[rpc]` takes its options in parentheses: `#[rpc(persisted, primary_key = id)]`",
            );
            return options;
        }
    };
    let mut seen = Seen::default();
    for meta in parse_list(args, errors) {
        let Some(key) = option_key(&meta, "rpc", RPC_OPTIONS, errors) else {
            continue;
        };
        if !seen.first(&key, errors) {
            continue;
        }
        match key.to_string().as_str() {
            "persisted" => match &meta {
                Meta::Path(_) => options.persisted = true,
                _ => errors.error_spanned_by(
                    &meta,
                    "`persisted` takes no value: write `#[rpc(persisted)]`",
                ),
            },
            "primary_key" => {
                if let Some(value) = value(&meta, "primary_key = order_id", errors) {
                    match expr_ident(value) {
                        Some(arg) => options.primary_key = Some((key.clone(), arg.clone())),
                        None => errors.error_spanned_by(
                            value,
                            "`primary_key` names one argument of the rpc, without quotes: \
                             `primary_key = order_id`",
                        ),
                    }
                }
            }
            other => errors.error_spanned_by(
                &key,
                format!("unknown rpc option `{other}`; valid options are {RPC_OPTIONS}"),
            ),
        }
    }
    options
}

/// Options already given, to report a repeated one.
#[derive(Default)]
pub(crate) struct Seen(Vec<String>);

impl Seen {
    /// False (and an error on `key`) when `key` was given before.
    pub(crate) fn first(&mut self, key: &Ident, errors: &mut Errors) -> bool {
        let name = key.to_string();
        if self.0.contains(&name) {
            errors.error_spanned_by(key, format!("`{name}` set multiple times"));
            return false;
        }
        self.0.push(name);
        true
    }
}

pub(crate) fn parse_list(args: TokenStream, errors: &mut Errors) -> Vec<Meta> {
    match Punctuated::<Meta, Token![,]>::parse_terminated.parse2(args) {
        Ok(list) => list.into_iter().collect(),
        Err(error) => {
            errors.push(error);
            Vec::new()
        }
    }
}

/// The option's name, when it is a single identifier.
pub(crate) fn option_key(
    meta: &Meta,
    attribute: &str,
    valid: &str,
    errors: &mut Errors,
) -> Option<Ident> {
    match meta.path().get_ident() {
        Some(ident) => Some(ident.clone()),
        None => {
            errors.error_spanned_by(
                meta.path(),
                format!("unknown {attribute} option; valid options are {valid}"),
            );
            None
        }
    }
}

/// The value of `key = value`; an error showing `example` when there is none.
pub(crate) fn value<'m>(meta: &'m Meta, example: &str, errors: &mut Errors) -> Option<&'m Expr> {
    match meta {
        Meta::NameValue(name_value) => Some(&name_value.value),
        _ => {
            let key = meta
                .path()
                .get_ident()
                .map(ToString::to_string)
                .unwrap_or_default();
            errors.error_spanned_by(meta, format!("`{key}` needs a value: `{example}`"));
            None
        }
    }
}

pub(crate) fn string_value(meta: &Meta, example: &str, errors: &mut Errors) -> Option<LitStr> {
    let value = value(meta, example, errors)?;
    match value {
        Expr::Lit(ExprLit {
            lit: Lit::Str(lit), ..
        }) => Some(lit.clone()),
        _ => {
            let key = meta
                .path()
                .get_ident()
                .map(ToString::to_string)
                .unwrap_or_default();
            errors.error_spanned_by(
                value,
                format!("`{key}` takes a string literal: `{example}`"),
            );
            None
        }
    }
}

fn mailbox_value(meta: &Meta, errors: &mut Errors) -> Option<usize> {
    let value = value(meta, "mailbox = 4096", errors)?;
    let capacity = match value {
        Expr::Lit(ExprLit {
            lit: Lit::Int(lit), ..
        }) => lit.base10_parse::<usize>().ok().filter(|&n| n >= 1),
        _ => None,
    };
    if capacity.is_none() {
        errors.error_spanned_by(
            value,
            "`mailbox` is the mailbox capacity: an integer literal of at least 1, like \
             `mailbox = 4096`",
        );
    }
    capacity
}

pub(crate) fn expr_ident(expr: &Expr) -> Option<&Ident> {
    match expr {
        Expr::Path(path) if path.qself.is_none() && path.attrs.is_empty() => path.path.get_ident(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quote::quote;
    use syn::parse_quote;

    fn entity(args: TokenStream) -> Result<EntityOptions, Vec<String>> {
        let mut errors = Errors::new();
        let options = parse_entity(args, &mut errors);
        match errors.finish() {
            Ok(()) => Ok(options),
            Err(error) => Err(error.into_iter().map(|e| e.to_string()).collect()),
        }
    }

    fn rpc(attr: Attribute) -> Result<RpcOptions, Vec<String>> {
        let mut errors = Errors::new();
        let options = parse_rpc(&attr, &mut errors);
        match errors.finish() {
            Ok(()) => Ok(options),
            Err(error) => Err(error.into_iter().map(|e| e.to_string()).collect()),
        }
    }

    #[test]
    fn no_entity_options_means_the_defaults() {
        let options = entity(quote!()).unwrap();
        assert!(options.name.is_none() && options.max_idle.is_none() && options.mailbox.is_none());
        assert!(!options.persisted_state);
    }

    #[test]
    fn every_entity_option_parses() {
        let options = entity(quote!(
            name = "bank.Account",
            max_idle = "90s",
            mailbox = 4096,
            state = persisted,
        ))
        .unwrap();
        assert_eq!(options.name.unwrap().value(), "bank.Account");
        assert_eq!(options.max_idle, Some(Duration::from_secs(90)));
        assert_eq!(options.mailbox, Some(4096));
        assert!(options.persisted_state);
    }

    #[test]
    fn an_unknown_entity_option_lists_the_valid_ones() {
        let errors = entity(quote!(shards = 3)).unwrap_err();
        assert_eq!(
            errors,
            [
                "unknown entity option `shards`; valid options are `name`, `max_idle`, `mailbox`, `state`"
            ]
        );
        let errors = entity(quote!(persisted)).unwrap_err();
        assert!(
            errors[0].ends_with("did you mean `state = persisted`?"),
            "{errors:?}"
        );
    }

    #[test]
    fn every_problem_is_reported_not_only_the_first() {
        let errors = entity(quote!(
            name = 3,
            max_idle = "soon",
            mailbox = 0,
            state = durable,
            name = "again"
        ))
        .unwrap_err();
        assert_eq!(errors.len(), 5, "{errors:?}");
        assert!(errors[0].starts_with("`name` takes a string literal"));
        assert!(errors[1].starts_with("`max_idle`: \"soon\" is not a duration"));
        assert!(errors[2].starts_with("`mailbox` is the mailbox capacity"));
        assert!(errors[3].starts_with("`state` is `persisted`"));
        assert_eq!(errors[4], "`name` set multiple times");
    }

    #[test]
    fn an_option_without_its_value_shows_an_example() {
        let errors = entity(quote!(mailbox)).unwrap_err();
        assert_eq!(errors, ["`mailbox` needs a value: `mailbox = 4096`"]);
    }

    #[test]
    fn rpc_options_parse() {
        let options = rpc(parse_quote!(#[rpc])).unwrap();
        assert!(!options.persisted && options.primary_key.is_none());
        let options = rpc(parse_quote!(#[rpc(persisted, primary_key = order_id)])).unwrap();
        assert!(options.persisted);
        assert_eq!(options.primary_key.unwrap().1, "order_id");
    }

    #[test]
    fn rpc_option_errors() {
        let errors = rpc(parse_quote!(#[rpc(durable)])).unwrap_err();
        assert_eq!(
            errors,
            ["unknown rpc option `durable`; valid options are `persisted`, `primary_key`"]
        );
        let errors = rpc(parse_quote!(#[rpc(persisted, persisted)])).unwrap_err();
        assert_eq!(errors, ["`persisted` set multiple times"]);
        let errors = rpc(parse_quote!(#[rpc(persisted = true, primary_key = "id")])).unwrap_err();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].starts_with("`persisted` takes no value"));
        assert!(errors[1].starts_with("`primary_key` names one argument"));
        let errors = rpc(parse_quote!(#[rpc = "persisted"])).unwrap_err();
        assert!(errors[0].starts_with("`#[rpc]` takes its options in parentheses"));
    }
}
