//! One `#[rpc]` method: its receiver, arguments and return type, checked.

use proc_macro2::{Span, TokenStream, TokenTree};
use quote::ToTokens;
use syn::visit_mut::VisitMut;
use syn::{FnArg, GenericArgument, Ident, ImplItemFn, Pat, PathArguments, ReturnType, Type};

use super::model::{Arg, Output, Rpc, unraw, variant_ident};
use crate::errors::Errors;
use crate::options;

/// The inherent methods of every generated client: an rpc may not take these names.
const CLIENT_METHODS: [&str; 4] = ["entity_id", "with_timeout", "deliver_at", "entity_ref"];

/// Checks one `#[rpc]` method. Returns the rpc when it has no error; every
/// problem found is in `errors`.
pub(super) fn parse_rpc(
    method: &ImplItemFn,
    options: options::RpcOptions,
    self_ty: &Type,
    errors: &mut Errors,
) -> Option<Rpc> {
    let sig = &method.sig;
    let name = &sig.ident;
    let tag = unraw(name);
    let before = errors.count();

    if sig.asyncness.is_none() {
        let fn_token = &sig.fn_token;
        errors.error_spanned_by(
            quote::quote!(#fn_token #name),
            format!("rpc `{tag}` must be an `async fn`: write `async fn {tag}(...)`"),
        );
    }
    if let Some(unsafety) = &sig.unsafety {
        errors.error_spanned_by(unsafety, "an rpc cannot be an `unsafe fn`");
    }
    if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
        let generics = &sig.generics;
        let where_clause = &generics.where_clause;
        errors.error_spanned_by(
            quote::quote!(#generics #where_clause),
            format!(
                "rpc `{tag}` cannot be generic (no type, const or lifetime parameters): each rpc \
                 is one variant of a concrete request enum; use concrete, owned types"
            ),
        );
    }
    if CLIENT_METHODS.contains(&tag.as_str()) {
        errors.error_spanned_by(
            name,
            format!(
                "rpc `{tag}` would clash with the method `{tag}` that every generated client \
                 has; rename the rpc"
            ),
        );
    }

    let mut inputs = sig.inputs.iter();
    match inputs.next() {
        Some(FnArg::Receiver(receiver)) => check_receiver(receiver, &tag, errors),
        _ => errors.error_spanned_by(
            name,
            format!(
                "rpc `{tag}` needs a `&self` or `&mut self` receiver: an rpc is a message to one \
                 entity; an associated function cannot be an rpc (remove `#[rpc]`)"
            ),
        ),
    }

    let variant = variant_ident(name);
    let mut args = Vec::new();
    let mut context = None;
    let typed_inputs = sig.inputs.iter().filter_map(|input| match input {
        FnArg::Typed(typed) => Some(typed),
        FnArg::Receiver(_) => None,
    });
    for (position, input) in typed_inputs.enumerate() {
        if is_context(&input.ty) {
            if let Type::Reference(reference) = &*input.ty
                && let Some(mutability) = &reference.mutability
            {
                errors.error_spanned_by(
                    mutability,
                    "take the context as `&EntityContext`, not `&mut EntityContext`",
                );
            }
            if context.is_some() {
                errors.error_spanned_by(
                    &input.ty,
                    format!("rpc `{tag}` takes `&EntityContext` twice; take it once"),
                );
            }
            context = Some(position);
            continue;
        }
        let Some(arg_name) = argument_name(&input.pat, &tag, &variant, errors) else {
            continue;
        };
        check_owned(
            &input.ty,
            &format!("argument `{}`", unraw(&arg_name)),
            errors,
        );
        args.push(Arg {
            name: arg_name,
            ty: replace_self(&input.ty, self_ty),
        });
    }

    let output = match &sig.output {
        ReturnType::Default => Output {
            ty: None,
            result: None,
        },
        ReturnType::Type(_, ty) => {
            check_owned(ty, "the return type", errors);
            let ty = replace_self(ty, self_ty);
            Output {
                result: result_arguments(&ty),
                ty: Some(ty),
            }
        }
    };

    let mut rpc = Rpc {
        method: name.clone(),
        variant,
        tag,
        args,
        context,
        output,
        persisted: options.persisted,
        primary_key: None,
        docs: method
            .attrs
            .iter()
            .filter(|attr| attr.path().is_ident("doc"))
            .cloned()
            .collect(),
        cfgs: method
            .attrs
            .iter()
            .filter(|attr| attr.path().is_ident("cfg"))
            .cloned()
            .collect(),
    };
    if let Some((key, arg)) = options.primary_key {
        rpc.primary_key = primary_key(&rpc, &key, &arg, errors);
    }
    (errors.count() == before).then_some(rpc)
}

fn check_receiver(receiver: &syn::Receiver, tag: &str, errors: &mut Errors) {
    let by_reference = match &*receiver.ty {
        Type::Reference(reference) => is_self_type(&reference.elem),
        _ => false,
    };
    if by_reference {
        return;
    }
    let message = if receiver.reference.is_none() && is_self_type(&receiver.ty) {
        format!(
            "rpc `{tag}` takes `self` by value, but the entity lives on after each call: take \
             `&self` or `&mut self`"
        )
    } else {
        format!("rpc `{tag}` must take `&self` or `&mut self`")
    };
    errors.error_spanned_by(receiver, message);
}

fn is_self_type(ty: &Type) -> bool {
    matches!(ty, Type::Path(path) if path.qself.is_none() && path.path.is_ident("Self"))
}

/// `&EntityContext` (by its last path segment, so `&flotilla::EntityContext` counts).
fn is_context(ty: &Type) -> bool {
    match ty {
        Type::Reference(reference) => match &*reference.elem {
            Type::Path(path) => path
                .path
                .segments
                .last()
                .is_some_and(|last| last.ident == "EntityContext" && last.arguments.is_none()),
            _ => false,
        },
        _ => false,
    }
}

fn argument_name(pat: &Pat, tag: &str, variant: &Ident, errors: &mut Errors) -> Option<Ident> {
    match pat {
        Pat::Ident(pat_ident) if pat_ident.by_ref.is_none() && pat_ident.subpat.is_none() => {
            Some(pat_ident.ident.clone())
        }
        _ => {
            errors.error_spanned_by(
                pat,
                format!(
                    "rpc arguments need a plain name (`name: Type`): each becomes a field of the \
                     request variant `{variant}` of rpc `{tag}`; destructure it inside the body"
                ),
            );
            None
        }
    }
}

/// Arguments and replies travel in messages: they must be owned, concrete types.
fn check_owned(ty: &Type, what: &str, errors: &mut Errors) {
    match ty {
        Type::Reference(_) => errors.error_spanned_by(
            ty,
            format!(
                "{what} is a reference, but it travels in a message and must be owned: use \
                 `String` for `&str`, `Vec<T>` for `&[T]`, `T` for `&T`"
            ),
        ),
        Type::ImplTrait(_) => errors.error_spanned_by(
            ty,
            format!("{what} cannot be `impl Trait`: rpcs are not generic; name a concrete type"),
        ),
        _ => {}
    }
}

/// `Result<T, E>`, recognized by its last path segment with two type arguments.
fn result_arguments(ty: &Type) -> Option<(Type, Type)> {
    let Type::Path(path) = ty else {
        return None;
    };
    let last = path.path.segments.last()?;
    if path.qself.is_some() || last.ident != "Result" {
        return None;
    }
    let PathArguments::AngleBracketed(arguments) = &last.arguments else {
        return None;
    };
    let types: Vec<&Type> = arguments
        .args
        .iter()
        .filter_map(|arg| match arg {
            GenericArgument::Type(ty) => Some(ty),
            _ => None,
        })
        .collect();
    match (types.as_slice(), arguments.args.len()) {
        ([ok, err], 2) => Some(((*ok).clone(), (*err).clone())),
        _ => None,
    }
}

fn primary_key(rpc: &Rpc, key: &Ident, arg: &Ident, errors: &mut Errors) -> Option<Arg> {
    let tag = &rpc.tag;
    if !rpc.persisted {
        errors.error_spanned_by(
            key,
            format!(
                "`primary_key` requires `persisted`: deduplication works on stored messages; \
                 write `#[rpc(persisted, primary_key = {arg})]`"
            ),
        );
    }
    let found = rpc
        .args
        .iter()
        .find(|candidate| unraw(&candidate.name) == unraw(arg));
    if found.is_none() {
        let names: Vec<String> = rpc
            .args
            .iter()
            .map(|a| format!("`{}`", unraw(&a.name)))
            .collect();
        let listed = if names.is_empty() {
            format!("rpc `{tag}` has no arguments to deduplicate by")
        } else {
            format!("its arguments are {}", names.join(", "))
        };
        errors.error_spanned_by(
            arg,
            format!(
                "`primary_key` names `{arg}`, which is not an argument of rpc `{tag}`; {listed}"
            ),
        );
    }
    found.cloned()
}

/// `ty` with every `Self` replaced by the entity type, spanned like the
/// `Self` it replaces (so an error on it still points at the user's token).
fn replace_self(ty: &Type, self_ty: &Type) -> Type {
    struct ReplaceSelf<'a>(&'a Type);
    impl VisitMut for ReplaceSelf<'_> {
        fn visit_type_mut(&mut self, ty: &mut Type) {
            if is_self_type(ty) {
                let span = ty.to_token_stream().into_iter().next().map(|t| t.span());
                let replacement = self.0.to_token_stream();
                let replacement = match span {
                    Some(span) => respan(replacement, span),
                    None => replacement,
                };
                *ty = syn::parse2(replacement).unwrap_or_else(|_| self.0.clone());
                return;
            }
            syn::visit_mut::visit_type_mut(self, ty);
        }
    }
    let mut ty = ty.clone();
    ReplaceSelf(self_ty).visit_type_mut(&mut ty);
    ty
}

fn respan(tokens: TokenStream, span: Span) -> TokenStream {
    tokens
        .into_iter()
        .map(|mut token| {
            if let TokenTree::Group(group) = &token {
                let mut new =
                    proc_macro2::Group::new(group.delimiter(), respan(group.stream(), span));
                new.set_span(span);
                token = TokenTree::Group(new);
            } else {
                token.set_span(span);
            }
            token
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use quote::quote;
    use syn::parse_quote;

    #[test]
    fn result_is_recognized_by_its_last_segment_and_two_type_arguments() {
        let (ok, err) = result_arguments(&parse_quote!(Result<i64, AccountError>)).unwrap();
        assert_eq!(quote!(#ok #err).to_string(), "i64 AccountError");
        assert!(result_arguments(&parse_quote!(std::result::Result<(), String>)).is_some());
        // One-argument aliases are plain values.
        assert!(result_arguments(&parse_quote!(io::Result<u8>)).is_none());
        assert!(result_arguments(&parse_quote!(Option<u8>)).is_none());
        assert!(result_arguments(&parse_quote!(Result<'static, u8>)).is_none());
    }

    #[test]
    fn self_is_replaced_by_the_entity_type_everywhere_in_a_type() {
        let self_ty: Type = parse_quote!(crate::bank::Account);
        let replaced = replace_self(&parse_quote!(Vec<(Self, Option<Self>)>), &self_ty);
        assert_eq!(
            quote!(#replaced).to_string(),
            quote!(Vec<(crate::bank::Account, Option<crate::bank::Account>)>).to_string()
        );
        let untouched = replace_self(&parse_quote!(SelfCheck), &self_ty);
        assert_eq!(quote!(#untouched).to_string(), "SelfCheck");
    }

    #[test]
    fn the_context_is_recognized_by_its_type_name() {
        assert!(is_context(&parse_quote!(&EntityContext)));
        assert!(is_context(&parse_quote!(&flotilla::EntityContext)));
        assert!(is_context(&parse_quote!(&mut EntityContext)));
        assert!(!is_context(&parse_quote!(EntityContext)));
        assert!(!is_context(&parse_quote!(&Context)));
    }
}
