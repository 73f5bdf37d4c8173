//! From the user's `impl` block to the [model](super::model).
//!
//! Each check records its error on the user's token and parsing goes on, so
//! one compile shows every problem. The `#[rpc]` attributes are stripped from
//! the block here whatever happens: the block is emitted even when there are
//! errors, so the IDE keeps seeing the user's methods.

use syn::{Attribute, Ident, ImplItem, ImplItemFn, ItemImpl, PathArguments, Type};

use super::model::{Entity, Rpc};
use super::rpc::parse_rpc;
use crate::errors::Errors;
use crate::options::{self, EntityOptions};

/// Checks `block` and strips its `#[rpc]` attributes. Returns the model when
/// the block is usable; every problem found is in `errors`.
pub(crate) fn parse(
    options: EntityOptions,
    block: &mut ItemImpl,
    errors: &mut Errors,
) -> Option<Entity> {
    let rpc_methods = strip_rpc_attributes(block, errors);

    if let Some((_, path, for_token)) = &block.trait_ {
        errors.error_spanned_by(
            quote::quote!(#path #for_token),
            "`#[entity]` goes on an inherent impl block (`impl Account { ... }`), not on a trait \
             impl: the rpcs are the type's own methods",
        );
    }
    let generic = !block.generics.params.is_empty() || block.generics.where_clause.is_some();
    if generic {
        let generics = &block.generics;
        let where_clause = &generics.where_clause;
        errors.error_spanned_by(
            quote::quote!(#generics #where_clause),
            "an entity type cannot be generic: each entity type has one wire name and one \
             concrete request enum; write the impl for a concrete type",
        );
    }
    let ident = entity_ident(&block.self_ty, !generic, errors);

    let has_rpcs = !rpc_methods.is_empty();
    let mut rpcs = Vec::new();
    for (method, rpc_options) in rpc_methods {
        if let Some(rpc) = parse_rpc(&method, rpc_options, &block.self_ty, errors) {
            rpcs.push(rpc);
        }
    }
    if !has_rpcs && block.trait_.is_none() {
        errors.error_spanned_by(
            &block.self_ty,
            "an entity needs at least one #[rpc] method: mark an `async fn` of this impl block \
             with `#[rpc]`",
        );
    }
    check_variant_names(&rpcs, errors);

    let ident = ident?;
    Some(Entity {
        self_ty: (*block.self_ty).clone(),
        ident,
        options,
        rpcs,
    })
}

/// Removes every `#[rpc]` from the block. Returns each method that had one,
/// with the attribute's options; `#[rpc]` elsewhere is an error.
fn strip_rpc_attributes(
    block: &mut ItemImpl,
    errors: &mut Errors,
) -> Vec<(ImplItemFn, options::RpcOptions)> {
    let mut methods = Vec::new();
    for item in &mut block.items {
        let attrs = match item {
            ImplItem::Fn(method) => &mut method.attrs,
            ImplItem::Const(item) => &mut item.attrs,
            ImplItem::Type(item) => &mut item.attrs,
            ImplItem::Macro(item) => &mut item.attrs,
            _ => continue,
        };
        let (rpc_attrs, kept): (Vec<Attribute>, Vec<Attribute>) =
            attrs.drain(..).partition(is_rpc_attribute);
        *attrs = kept;
        let mut rpc_attrs = rpc_attrs.into_iter();
        let Some(first) = rpc_attrs.next() else {
            continue;
        };
        let rpc_options = options::parse_rpc(&first, errors);
        for repeated in rpc_attrs {
            errors.error_spanned_by(
                &repeated,
                "`#[rpc]` set multiple times: give one `#[rpc(...)]` with all the options",
            );
        }
        match item {
            ImplItem::Fn(method) => methods.push((method.clone(), rpc_options)),
            _ => errors.error_spanned_by(
                &first,
                "`#[rpc]` goes on an `async fn` method of the impl block",
            ),
        }
    }
    methods
}

/// `#[rpc]`, `#[flotilla::rpc]` or `#[::flotilla::rpc]`.
pub(crate) fn is_rpc_attribute(attr: &Attribute) -> bool {
    let path = attr.path();
    let segments: Vec<String> = path.segments.iter().map(|s| s.ident.to_string()).collect();
    match segments.as_slice() {
        [rpc] => rpc == "rpc" && path.leading_colon.is_none(),
        [flotilla, rpc] => flotilla == "flotilla" && rpc == "rpc",
        _ => false,
    }
}

/// The entity type's name. `report_arguments` is false when the impl's own
/// generics were already reported (`impl<T> Cache<T>`).
fn entity_ident(self_ty: &Type, report_arguments: bool, errors: &mut Errors) -> Option<Ident> {
    if let Type::Path(path) = self_ty
        && path.qself.is_none()
        && let Some(last) = path.path.segments.last()
    {
        if matches!(last.arguments, PathArguments::None) {
            return Some(last.ident.clone());
        }
        if !report_arguments {
            return None;
        }
        errors.error_spanned_by(
            &last.arguments,
            "an entity type cannot have generic arguments: each entity type has one wire name \
             and one concrete request enum",
        );
        return None;
    }
    errors.error_spanned_by(
        self_ty,
        "`#[entity]` needs a named type after `impl`, like `impl Account { ... }`",
    );
    None
}

fn check_variant_names(rpcs: &[Rpc], errors: &mut Errors) {
    for (i, rpc) in rpcs.iter().enumerate() {
        if let Some(earlier) = rpcs[..i].iter().find(|r| r.variant == rpc.variant) {
            errors.error_spanned_by(
                &rpc.method,
                format!(
                    "rpcs `{}` and `{}` both become the request variant `{}`; rename one",
                    earlier.tag, rpc.tag, rpc.variant
                ),
            );
        }
    }
}
