# The values the GitHub repository's variables take (docs/automation.md).
output "WIF_PROVIDER" {
  value = google_iam_workload_identity_pool_provider.github.name
}

output "BUILDER_SA" {
  value = google_service_account.builder.email
}

# Per GitHub environment: its DEPLOYER_SA and KVSTACK_NAMESPACE variables.
output "DEPLOYER_SAS" {
  value = { for env, sa in google_service_account.deployer : env => sa.email }
}

output "NAMESPACES" {
  value = var.namespaces
}

output "GAR_REPOSITORY" {
  value = "${var.region}-docker.pkg.dev/${var.project}/${google_artifact_registry_repository.images.repository_id}"
}

output "GKE_CLUSTER" {
  value = google_container_cluster.kvstack.name
}
