//! Edits of `spec.storage` once members have volumes. A StatefulSet's volumeClaimTemplates
//! cannot be changed (the API server answers 422), and a new template would not change the
//! claims already made from the old one anyway. So a larger size is carried out on the
//! claims themselves (the StorageClass's resizer does the rest), and the StatefulSet is
//! then re-created around its running pods: deleted with its pods orphaned, applied again
//! with the new template, and adopting them, so members keep running and members added
//! later get claims of the new size. What no claim can do (shrink, change class) is refused
//! and the StatefulSet keeps its template, so every other part of the spec still applies.

use std::cmp::Ordering;

use consensus_crds::StorageSpec;
use consensus_crds::quantity;

/// The volume template a StatefulSet was made with, or a member's claim.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Volume {
    /// The requested size, as written.
    pub size: Option<String>,
    /// The StorageClass; on a claim the one it was bound with (the default filled in).
    pub class: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum StorageChange {
    /// The StatefulSet's template is as the spec says.
    #[default]
    None,
    /// Raise these claims to `size`, then re-create the StatefulSet with the new template.
    Expand { claims: Vec<String>, size: String },
    /// The claims already are as the spec says; only the StatefulSet's template is behind.
    Recreate,
    /// The StatefulSet keeps the template it has, and this says why.
    Refuse(String),
}

/// What to do about `spec` for a StatefulSet made with `template` whose members have
/// `claims` (by name); `expandable` is the claims' StorageClass's `allowVolumeExpansion`,
/// `None` when not known (no class, or not looked up).
pub fn change(
    spec: &StorageSpec,
    template: &Volume,
    claims: &[(String, Volume)],
    expandable: Option<bool>,
) -> StorageChange {
    let class = |c: Option<&str>| c.map_or_else(|| "the default class".to_owned(), |c| format!("{c:?}"));
    let was = template.size.as_deref().unwrap_or("unknown");
    let size = match template.size.as_deref().map(|old| quantity::compare(&spec.size, old)) {
        Some(Some(order)) => order,
        _ => {
            return StorageChange::Refuse(format!(
                "spec.storage.size {} cannot be compared with the volumes' {was}",
                spec.size
            ));
        }
    };
    if spec.storage_class_name != template.class {
        // Naming the class the volumes already have (the default, written out) changes no
        // volume: only the template is re-made.
        let all_there = spec.storage_class_name.is_some()
            && claims.iter().all(|(_, claim)| claim.class == spec.storage_class_name);
        if !all_there {
            return StorageChange::Refuse(format!(
                "spec.storage.storageClassName changed from {} to {}: a member's volume cannot move \
                 to another StorageClass, so the members keep theirs; set it back (moving members to \
                 another class means replacing them one at a time, which the operator does not do)",
                class(template.class.as_deref()),
                class(spec.storage_class_name.as_deref())
            ));
        }
    }
    match size {
        Ordering::Less => {
            return StorageChange::Refuse(format!(
                "spec.storage.size {} is smaller than the volumes' {was}: volumes cannot shrink; set it \
                 back to {was} or more",
                spec.size
            ));
        }
        Ordering::Equal if spec.storage_class_name == template.class => return StorageChange::None,
        Ordering::Equal | Ordering::Greater => {}
    }
    let smaller: Vec<String> = claims
        .iter()
        .filter(|(_, claim)| {
            let order = claim.size.as_deref().and_then(|s| quantity::compare(s, &spec.size));
            !matches!(order, Some(Ordering::Equal | Ordering::Greater))
        })
        .map(|(name, _)| name.clone())
        .collect();
    if smaller.is_empty() {
        return StorageChange::Recreate;
    }
    if expandable != Some(true) {
        let mut classes: Vec<String> = claims.iter().map(|(_, c)| class(c.class.as_deref())).collect();
        classes.sort();
        classes.dedup();
        return StorageChange::Refuse(format!(
            "spec.storage.size {} needs the volumes expanded, and {} does not allow volume expansion \
             (allowVolumeExpansion); the volumes stay {was}",
            spec.size,
            classes.join(", ")
        ));
    }
    StorageChange::Expand { claims: smaller, size: spec.size.clone() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(size: &str, class: Option<&str>) -> StorageSpec {
        StorageSpec {
            size: size.to_owned(),
            storage_class_name: class.map(str::to_owned),
            ..StorageSpec::default()
        }
    }

    fn volume(size: &str, class: Option<&str>) -> Volume {
        Volume { size: Some(size.to_owned()), class: class.map(str::to_owned) }
    }

    fn claims(sizes: &[&str], class: &str) -> Vec<(String, Volume)> {
        sizes.iter().enumerate().map(|(i, s)| (format!("data-demo-{i}"), volume(s, Some(class)))).collect()
    }

    #[test]
    fn an_unchanged_spec_changes_nothing_whatever_the_notation() {
        let template = volume("1Gi", None);
        let three = claims(&["1Gi", "1Gi", "1Gi"], "local");
        assert_eq!(change(&spec("1Gi", None), &template, &three, None), StorageChange::None);
        assert_eq!(change(&spec("1024Mi", None), &template, &three, None), StorageChange::None);
    }

    #[test]
    fn a_larger_size_expands_the_smaller_claims_where_the_class_allows_it() {
        let template = volume("1Gi", None);
        // One claim was expanded before the operator died: only the other two are left.
        let claims = claims(&["1Gi", "2Gi", "1Gi"], "local");
        assert_eq!(
            change(&spec("2Gi", None), &template, &claims, Some(true)),
            StorageChange::Expand {
                claims: vec!["data-demo-0".into(), "data-demo-2".into()],
                size: "2Gi".into()
            }
        );
        let StorageChange::Refuse(why) = change(&spec("2Gi", None), &template, &claims, Some(false)) else {
            panic!("a class without expansion must refuse")
        };
        assert!(why.contains("does not allow volume expansion") && why.contains("\"local\""), "{why}");
        assert!(matches!(change(&spec("2Gi", None), &template, &claims, None), StorageChange::Refuse(_)));
    }

    #[test]
    fn once_every_claim_is_large_enough_only_the_template_is_re_made() {
        let template = volume("1Gi", None);
        let claims = claims(&["2Gi", "2Gi", "2Gi"], "local");
        assert_eq!(change(&spec("2Gi", None), &template, &claims, None), StorageChange::Recreate);
    }

    #[test]
    fn volumes_never_shrink_and_never_change_class() {
        let template = volume("2Gi", None);
        let claims = claims(&["2Gi", "2Gi", "2Gi"], "local");
        let StorageChange::Refuse(why) = change(&spec("1Gi", None), &template, &claims, Some(true)) else {
            panic!("a shrink must be refused")
        };
        assert!(why.contains("cannot shrink") && why.contains("2Gi"), "{why}");
        let StorageChange::Refuse(why) = change(&spec("2Gi", Some("fast")), &template, &claims, Some(true))
        else {
            panic!("a class change must be refused")
        };
        assert!(why.contains("the default class to \"fast\""), "{why}");
        // Refused as a whole: a size change alongside does not sneak through.
        assert!(matches!(
            change(&spec("3Gi", Some("fast")), &template, &claims, Some(true)),
            StorageChange::Refuse(_)
        ));
    }

    #[test]
    fn naming_the_class_the_volumes_already_have_re_makes_only_the_template() {
        let template = volume("1Gi", None);
        let claims = claims(&["1Gi", "1Gi", "1Gi"], "local");
        assert_eq!(change(&spec("1Gi", Some("local")), &template, &claims, None), StorageChange::Recreate);
    }
}
