{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "unet-server.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name used for every object (the release name alone when it already holds the chart name). */}}
{{- define "unet-server.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "unet-server.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "unet-server.labels" -}}
helm.sh/chart: {{ include "unet-server.chart" . }}
{{ include "unet-server.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The pods' identity: Deployment, Service, PDB and ServiceMonitor all select on exactly these. */}}
{{- define "unet-server.selectorLabels" -}}
app.kubernetes.io/name: {{ include "unet-server.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "unet-server.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag | toString) }}
{{- end }}

{{/* The gauge the autoscaler targets: rows of admitted requests per pod (server/metrics.py). */}}
{{- define "unet-server.autoscalingMetric" -}}
unet_server_outstanding_rows
{{- end }}

{{/* Seconds the startup probe allows for load + warm-up (torch.compile of every bucket takes much longer). */}}
{{- define "unet-server.startupBudgetSeconds" -}}
{{- if .Values.settings.compile }}{{ .Values.probes.startup.compileBudgetSeconds }}{{ else }}{{ .Values.probes.startup.budgetSeconds }}{{ end }}
{{- end }}

{{/* PromQL: the per-pod gauge, smoothed over the adapter window (one scrape is a noisy sample of a queue). */}}
{{- define "unet-server.kedaQuery" -}}
{{- printf "sum(avg_over_time(%s{namespace=\"%s\",service=\"%s\"}[%s]))" (include "unet-server.autoscalingMetric" .) .Release.Namespace (include "unet-server.fullname" .) .Values.autoscaling.metricWindow }}
{{- end }}
