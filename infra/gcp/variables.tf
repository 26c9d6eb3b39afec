variable "project" {
  description = "Google Cloud project id"
  type        = string
}

variable "region" {
  description = "Region of the Artifact Registry repository and the regional Autopilot cluster"
  type        = string
  default     = "europe-west1"
}

variable "github_repository" {
  description = "owner/name of the only GitHub repository whose workflows may authenticate"
  type        = string
}

variable "cluster_name" {
  description = "The one regional GKE Autopilot cluster both environments share"
  type        = string
  default     = "kvstack"
}

variable "namespaces" {
  description = "GitHub environment -> its namespace in the cluster (staging deploys on every push to main; production after review)"
  type        = map(string)
  default = {
    staging    = "kvstack-staging"
    production = "kvstack"
  }
}

variable "repository_id" {
  description = "Artifact Registry repository name"
  type        = string
  default     = "kvstack"
}

variable "binary_authorization" {
  description = "Enforce the project's Binary Authorization policy on the cluster (see docs/automation.md)"
  type        = bool
  default     = false
}

variable "deletion_protection" {
  description = "Refuse to destroy the cluster (false keeps tear-down one command)"
  type        = bool
  default     = false
}

variable "backup_cron" {
  description = "When Backup for GKE backs up the kvstack namespaces (cron, UTC): every 6 hours"
  type        = string
  default     = "0 */6 * * *"
}

variable "backup_retain_days" {
  description = "How many days each scheduled backup is kept"
  type        = number
  default     = 14
}
