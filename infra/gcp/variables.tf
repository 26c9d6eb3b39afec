variable "project" {
  description = "Google Cloud project id"
  type        = string
}

variable "region" {
  description = "Region of the Artifact Registry repository and the regional Autopilot clusters"
  type        = string
  default     = "europe-west1"
}

variable "github_repository" {
  description = "owner/name of the only GitHub repository whose workflows may authenticate"
  type        = string
}

variable "environments" {
  description = "One regional GKE Autopilot cluster per environment (GitHub environments of the same names)"
  type        = set(string)
  default     = ["staging", "production"]
}

variable "repository_id" {
  description = "Artifact Registry repository name"
  type        = string
  default     = "kvstack"
}

variable "binary_authorization" {
  description = "Enforce the project's Binary Authorization policy on the clusters (see docs/automation.md)"
  type        = bool
  default     = false
}

variable "deletion_protection" {
  description = "Refuse to destroy the clusters (false keeps tear-down one command)"
  type        = bool
  default     = false
}
