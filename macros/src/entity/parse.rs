//! From the user's `impl` block to the model the expansion works from.
//!
//! Each check records its error on the user's token and parsing goes on, so
//! one compile shows every problem. The `#[rpc]` attributes are stripped from
//! the block here whatever happens: the block is emitted even when there are
//! errors, so the IDE keeps seeing the user's methods.

use proc_macro2::{Span, TokenStream, TokenTree};
use quote::{ToTokens, format_ident};
use syn::visit_mut::VisitMut;
use syn::{
    Attribute, FnArg, GenericArgument, Ident, ImplItem, ImplItemFn, ItemImpl, Pat, PathArguments,
    ReturnType, Type, parse_quote,
};

use crate::errors::Errors;
use crate::options::{self, EntityOptions};

/// One `#[entity]` impl block, checked.
#[derive(Debug)]
pub(crate) struct Entity {
    /// The entity type as written after `impl`.
    pub(crate) self_ty: Type,
    /// Its name: the base of the generated `{Type}Request`, `{Type}Reply`, `{Type}Client`.
    pub(crate) ident: Ident,
    pub(crate) options: EntityOptions,
    pub(crate) rpcs: Vec<Rpc>,
}

/// One `#[rpc]` method.
#[derive(Debug)]
pub(crate) struct Rpc {
    /// The method's name.
    pub(crate) method: Ident,
    /// Its request and reply variant: the method name in UpperCamelCase.
    pub(crate) variant: Ident,
    /// The wire tag: the method name (without `r#`). Stored with persisted messages.
    pub(crate) tag: String,
    /// The arguments that travel in the request, in the user's order.
    pub(crate) args: Vec<Arg>,
    /// Where the `&EntityContext` argument is among the arguments after the
    /// receiver, if the rpc takes one.
    pub(crate) context: Option<usize>,
    pub(crate) output: Output,
    pub(crate) persisted: bool,
    /// The argument named by `primary_key`.
    pub(crate) primary_key: Option<Arg>,
    /// The method's `///` docs, copied onto the client method.
    pub(crate) docs: Vec<Attribute>,
    /// The method's `#[cfg]`s, repeated on every generated piece of this rpc.
    pub(crate) cfgs: Vec<Attribute>,
}

/// An argument that travels in the request, as a named field.
#[derive(Debug, Clone)]
pub(crate) struct Arg {
    pub(crate) name: Ident,
    /// The type, with `Self` replaced by the entity type (the generated items
    /// live outside the impl block).
    pub(crate) ty: Type,
}

/// What an rpc returns.
#[derive(Debug)]
pub(crate) struct Output {
    /// The declared return type; `None` for a method without `->`.
    pub(crate) ty: Option<Type>,
    /// `Some((T, E))` when the return type is `Result<T, E>`: the client then
    /// returns `Result<T, ClusterError<E>>`, else `Result<ty, ClusterError>`.
    pub(crate) result: Option<(Type, Type)>,
}

impl Output {
    /// The type the reply variant holds (`()` for a method without `->`).
    pub(crate) fn reply_type(&self) -> Type {
        self.ty.clone().unwrap_or_else(|| parse_quote!(()))
    }
}

/// The inherent methods of every generated client: an rpc may not take these names.
const CLIENT_METHODS: [&str; 4] = ["entity_id", "with_timeout", "deliver_at", "entity_ref"];

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

fn parse_rpc(
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

/// `get_balance` becomes `GetBalance`, with the method's span.
pub(crate) fn variant_ident(method: &Ident) -> Ident {
    let camel: String = unraw(method)
        .split('_')
        .filter(|part| !part.is_empty())
        .map(|part| {
            let mut chars = part.chars();
            chars
                .next()
                .map(|first| first.to_uppercase().chain(chars).collect::<String>())
                .unwrap_or_default()
        })
        .collect();
    format_ident!("{}", camel, span = method.span())
}

/// The identifier's text without a leading `r#`.
pub(crate) fn unraw(ident: &Ident) -> String {
    let text = ident.to_string();
    text.strip_prefix("r#").map(str::to_owned).unwrap_or(text)
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
