# The values the GitHub repository's variables take (docs/automation.md).
output "WIF_PROVIDER" {
  value = google_iam_workload_identity_pool_provider.github.name
}

output "DEPLOYER_SA" {
  value = google_service_account.deployer.email
}

output "GAR_REPOSITORY" {
  value = "${var.region}-docker.pkg.dev/${var.project}/${google_artifact_registry_repository.images.repository_id}"
}

output "GKE_CLUSTERS" {
  value = { for env, cluster in google_container_cluster.env : env => cluster.name }
}
